//! Every `pg_netstat.*` setting: registration, bounds, validation and a typed snapshot.
//! All but `max_flows` and `history` are reloadable (PGC_SIGHUP): the worker re-reads them
//! on `pg_ctl reload`. Those two size shared memory and take a restart.

use pg_netstat_core::capture::filter::MAX_PORTS;
use pg_netstat_core::capture::{valid_device_name, CaptureMethod, MAX_DEVICES, MAX_DEVICE_NAME};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use std::ffi::{c_char, c_void, CStr, CString};

pub static INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static PACKET_WAIT_TIME: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static PCAP_BUFFER_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
pub static PCAP_SNAPLEN: GucSetting<i32> = GucSetting::<i32>::new(96);
pub static PCAP_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static DEVICES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static CAPTURE_LOOPBACK: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static PORTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static MAX_FLOWS: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static FLOW_IDLE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static HISTORY: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static SAVE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(300);
pub static MAX_STATEMENTS: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static TRACK_STATEMENTS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// The raw value of pg_netstat.capture_method (an index into CAPTURE_METHODS).
static mut CAPTURE_METHOD: std::ffi::c_int = 0;

/// The choices of pg_netstat.capture_method; `val` is the CaptureMethod discriminant.
struct EnumEntries([pg_sys::config_enum_entry; 4]);
// SAFETY: read-only static data (pointers to static C strings).
unsafe impl Sync for EnumEntries {}
static CAPTURE_METHODS: EnumEntries = EnumEntries([
    pg_sys::config_enum_entry { name: c"auto".as_ptr(), val: CaptureMethod::Auto as i32, hidden: false },
    pg_sys::config_enum_entry { name: c"ring".as_ptr(), val: CaptureMethod::Ring as i32, hidden: false },
    pg_sys::config_enum_entry { name: c"pcap".as_ptr(), val: CaptureMethod::Pcap as i32, hidden: false },
    pg_sys::config_enum_entry { name: std::ptr::null(), val: 0, hidden: false },
]);

/// Smallest snaplen that still reaches the TCP ports behind Ethernet, an 802.1Q tag and
/// a maximal IPv4 header (14 + 4 + 60 + 4 = 82), with room to spare; the original's
/// lower bound too.
pub const MIN_SNAPLEN: i32 = 96;
/// Most intervals `pg_netstat.history` may keep per device.
const MAX_HISTORY: i32 = pg_netstat_core::history::MAX_HISTORY as i32;

/// The unit of a numeric setting, as PostgreSQL reads and shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    None,
    Seconds,
    Milliseconds,
    Bytes,
}

impl Unit {
    fn flags(self) -> GucFlags {
        match self {
            Unit::None => GucFlags::default(),
            Unit::Seconds => GucFlags::UNIT_S,
            Unit::Milliseconds => GucFlags::UNIT_MS,
            Unit::Bytes => GucFlags::UNIT_BYTE,
        }
    }

    /// The symbol PostgreSQL prints after such a value, and the units a value may carry.
    fn words(self) -> Option<(&'static str, &'static str)> {
        match self {
            Unit::None => None,
            Unit::Seconds => Some(("s", "us, ms, s, min, h or d")),
            Unit::Milliseconds => Some(("ms", "us, ms, s, min, h or d")),
            Unit::Bytes => Some(("B", "B, kB, MB, GB or TB")),
        }
    }
}

/// A numeric setting. Its bounds are written here once: for its definition, and for the
/// hint that says what is allowed when PostgreSQL cannot read a value as a number.
struct IntSetting {
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    value: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    unit: Unit,
    /// Takes a server restart (PGC_POSTMASTER) instead of a reload.
    restart: bool,
}

static INT_SETTINGS: [IntSetting; 10] = [
    IntSetting {
        name: c"pg_netstat.interval",
        short: c"Length of one statistics interval.",
        long: c"Packets are counted in wall-clock-aligned intervals of this length; each device keeps the last pg_netstat.history.",
        value: &INTERVAL,
        min: 1,
        max: 900_000,
        unit: Unit::Seconds,
        restart: false,
    },
    IntSetting {
        name: c"pg_netstat.packet_wait_time",
        short: c"How long after its end an interval stays open for packets still in the kernel.",
        long: c"Must exceed pg_netstat.pcap_timeout, the longest the kernel holds a partly filled ring block.",
        value: &PACKET_WAIT_TIME,
        min: 1,
        max: 60,
        unit: Unit::Seconds,
        restart: false,
    },
    IntSetting {
        name: c"pg_netstat.pcap_buffer_size",
        short: c"Capture buffer size per device.",
        long: c"Size of each device's TPACKET_V3 ring (rounded up to whole blocks). Memory outside shared_buffers.",
        value: &PCAP_BUFFER_SIZE,
        min: 131_070,
        max: 1 << 30,
        unit: Unit::Bytes,
        restart: false,
    },
    IntSetting {
        name: c"pg_netstat.pcap_snaplen",
        short: c"Bytes of each packet copied for header parsing.",
        long: c"Only headers are parsed; payload is never read or kept. Lengths are counted from the original packet.",
        value: &PCAP_SNAPLEN,
        min: MIN_SNAPLEN,
        max: 65_535,
        unit: Unit::Bytes,
        restart: false,
    },
    IntSetting {
        name: c"pg_netstat.pcap_timeout",
        short: c"Longest time the kernel holds a partly filled capture block.",
        long: c"Becomes the ring's block retire timeout.",
        value: &PCAP_TIMEOUT,
        min: 1,
        max: 30_000,
        unit: Unit::Milliseconds,
        restart: false,
    },
    IntSetting {
        name: c"pg_netstat.max_flows",
        short: c"Most TCP connections tracked at once for the per-connection, role and database views.",
        long: c"Sized in shared memory at server start; 0 turns per-connection accounting off. When full, closed and then least recently seen connections are folded into the role and database totals to make room.",
        value: &MAX_FLOWS,
        min: 0,
        max: 1 << 20,
        unit: Unit::None,
        restart: true,
    },
    IntSetting {
        name: c"pg_netstat.flow_idle_timeout",
        short: c"A connection with no packets for this long is folded into the role and database totals.",
        long: c"0 keeps idle connections until the table needs their place.",
        value: &FLOW_IDLE_TIMEOUT,
        min: 0,
        max: i32::MAX / 1000,
        unit: Unit::Seconds,
        restart: false,
    },
    IntSetting {
        name: c"pg_netstat.history",
        short: c"Closed intervals kept per device.",
        long: c"Sized in shared memory at server start: 160 bytes per interval for each of 16 device places. 86400 holds a day of 1-second or two months of 1-minute intervals.",
        value: &HISTORY,
        min: 1,
        max: MAX_HISTORY,
        unit: Unit::None,
        restart: true,
    },
    IntSetting {
        name: c"pg_netstat.save_interval",
        short: c"How often everything counted is saved to pg_stat/pg_netstat.stat.",
        long: c"It is always saved at a clean shutdown; this bounds what a crash loses. 0 saves only at shutdown.",
        value: &SAVE_INTERVAL,
        min: 0,
        max: 86_400,
        unit: Unit::Seconds,
        restart: false,
    },
    IntSetting {
        name: c"pg_netstat.max_statements",
        short: c"Most statements (role, database, query id) counted apart in pg_netstat_statements.",
        long: c"Sized in shared memory at server start (about 150 bytes each). When full, the statement charged least recently is folded into its role's and database's 'other' row.",
        value: &MAX_STATEMENTS,
        min: 10,
        max: 1_000_000,
        unit: Unit::None,
        restart: true,
    },
];

/// The Boolean settings, for the hint on a value PostgreSQL cannot read as one.
const BOOL_SETTINGS: [&CStr; 2] = [c"pg_netstat.capture_loopback", c"pg_netstat.track_statements"];

const BOOL_ALLOWED: &str = "Allowed values: on, off, true, false, yes, no, 1, 0.";

/// Defines the settings. After the log hook (`log_hook::install`): a bad value in
/// postgresql.conf, refused while they are defined, is then logged with what is allowed.
pub fn init() {
    for s in &INT_SETTINGS {
        let context = if s.restart { GucContext::Postmaster } else { GucContext::Sighup };
        GucRegistry::define_int_guc(s.name, s.short, s.long, s.value, s.min, s.max, context, s.unit.flags());
    }
    // SAFETY: called once from _PG_init in the postmaster; the static outlives the GUC.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"pg_netstat.devices".as_ptr(),
            c"Network devices to capture, comma-separated.".as_ptr(),
            c"Empty means the first device that is up and not loopback.".as_ptr(),
            DEVICES.as_ptr(),
            c"".as_ptr(),
            pg_sys::GucContext::PGC_SIGHUP,
            0,
            Some(check_devices),
            None,
            None,
        );
    }
    // SAFETY: as above.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"pg_netstat.ports".as_ptr(),
            c"Extra TCP ports to count besides the server's own, comma-separated.".as_ptr(),
            c"For example a connection pooler's port. Counted together with the server port, per device.".as_ptr(),
            PORTS.as_ptr(),
            c"".as_ptr(),
            pg_sys::GucContext::PGC_SIGHUP,
            0,
            Some(check_ports),
            None,
            None,
        );
        pg_sys::DefineCustomEnumVariable(
            c"pg_netstat.capture_method".as_ptr(),
            c"How packets are captured: auto, ring (AF_PACKET TPACKET_V3) or pcap (libpcap).".as_ptr(),
            c"auto uses the ring where it can be opened, else libpcap when built in.".as_ptr(),
            &raw mut CAPTURE_METHOD,
            CaptureMethod::Auto as i32,
            CAPTURE_METHODS.0.as_ptr(),
            pg_sys::GucContext::PGC_SIGHUP,
            0,
            Some(check_capture_method),
            None,
            None,
        );
    }
    GucRegistry::define_bool_guc(
        c"pg_netstat.capture_loopback",
        c"Also capture the loopback device.",
        c"Counts connections made over 127.0.0.1 and ::1 as well.",
        &CAPTURE_LOOPBACK,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // Superuser-settable like pg_stat_statements.track: a session may turn it off for
    // itself (what it sends while off is not charged to anything).
    GucRegistry::define_bool_guc(
        c"pg_netstat.track_statements",
        c"Count network bytes per statement from each backend's own TCP socket.",
        c"One getsockopt(TCP_INFO) per top-level statement in each TCP client backend; Unix-socket connections are never counted.",
        &TRACK_STATEMENTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    reserve_prefix();
}

fn reserve_prefix() {
    // SAFETY: plain call with a static C string, during _PG_init.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"pg_netstat".as_ptr()) }
}

/// GUC check hooks: a malformed list is rejected before it takes effect, so a bad
/// `pg_ctl reload` keeps the old value (PostgreSQL logs our detail) and `ALTER SYSTEM`
/// fails with it. The detail says what is wrong, the hint what is allowed.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_devices(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the candidate value.
    unsafe { check_list(newval, &devices_allowed(), |t| parse_device_list(t).map(|_| ())) }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_ports(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as above.
    unsafe { check_list(newval, &ports_allowed(), |t| parse_port_list(t).map(|_| ())) }
}

fn devices_allowed() -> String {
    format!(
        "Allowed values: up to {MAX_DEVICES} network device names ({MAX_DEVICE_NAME} characters at most, no blanks, '/' or ':'), \
         each once, separated by commas, e.g. 'eth0,lo'; empty for the first device that is up and not loopback."
    )
}

fn ports_allowed() -> String {
    format!(
        "Allowed values: up to {} TCP port numbers from 1 to 65535, each once, separated by commas, e.g. '6432,6433'; \
         empty for the server's own port alone.",
        MAX_PORTS - 1
    )
}

unsafe fn check_list(newval: *mut *mut c_char, allowed: &str, parse: impl Fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: the caller passes PostgreSQL's pointer to the candidate value (NULL allowed).
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval)
    };
    let detail = match value.to_str() {
        Err(_) => "The value is not valid UTF-8.".to_string(),
        Ok(text) => match parse(text) {
            Ok(()) => return true,
            Err(detail) => detail,
        },
    };
    set_check_detail(&detail);
    set_check_hint(allowed);
    false
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_capture_method(
    newval: *mut std::ffi::c_int,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the candidate value.
    let value = unsafe { *newval };
    if value == CaptureMethod::Pcap as i32 && !CaptureMethod::PCAP_BUILT_IN {
        set_check_detail("This build of pg_netstat has no libpcap backend.");
        set_check_hint(
            "Build it with the pcap feature (needs libpcap-dev): cargo pgrx install --release --features pcap",
        );
        return false;
    }
    if value == CaptureMethod::Ring as i32 && !CaptureMethod::RING_BUILT_IN {
        set_check_detail("This build of pg_netstat has no AF_PACKET ring (it is the portable build).");
        set_check_hint("Use auto or pcap, or on Linux install a build without the portable feature.");
        return false;
    }
    true
}

fn set_check_hint(hint: &str) {
    let c = CString::new(hint.replace('\0', " ")).unwrap_or_default();
    // SAFETY: as for the detail below.
    unsafe {
        pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(c.as_ptr());
    }
}

fn set_check_detail(detail: &str) {
    let c = CString::new(detail.replace('\0', " ")).unwrap_or_default();
    // SAFETY: GUC_check_errdetail_string expects a palloc'd string in the current
    // context; pstrdup makes one from our NUL-terminated copy.
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(c.as_ptr());
    }
}

/// PostgreSQL reads a number before any check hook could see it, so a value it cannot
/// read at all ("ten", "5 parsecs", "3GB" past the integer range) or a Boolean it does
/// not know is refused with a message that names the value but not what is allowed.
/// The settings' part of the log hook (`log_hook`) adds that as a hint, for pg_netstat's
/// own settings only: to the error ALTER SYSTEM returns, and to the log lines of a reload
/// or of the server start. PostgreSQL documents that a log hook should change no more of
/// the report than whether it is logged; adding a hint that was missing (or appending to
/// PostgreSQL's units hint) is as small as that can be, and it is done before the report
/// is sent anywhere.
///
/// # Safety
/// `edata` is the report being emitted (its strings NUL-terminated or NULL), in the
/// memory context current here.
pub unsafe fn on_report(edata: &mut pg_sys::ErrorData) {
    // SAFETY: by the caller's promise. The new hint is palloc'd in the report's own
    // context, which is current here, so it lives as long as the report.
    unsafe {
        if !edata.message_id.is_null() && !edata.message.is_null() {
            let id = CStr::from_ptr(edata.message_id).to_bytes();
            let old = (!edata.hint.is_null()).then(|| CStr::from_ptr(edata.hint).to_string_lossy());
            if let Some(hint) = refusal_hint(id, &CStr::from_ptr(edata.message).to_string_lossy(), old.as_deref()) {
                if let Ok(c) = CString::new(hint) {
                    edata.hint = pg_sys::pstrdup(c.as_ptr());
                }
            }
        }
    }
}

/// The hint for a report PostgreSQL made about one of our settings, or `None` to leave
/// it alone. `message_id` is the untranslated format string (so this works whatever
/// lc_messages says); `message` the formatted text, which names the setting.
fn refusal_hint(message_id: &[u8], message: &str, old_hint: Option<&str>) -> Option<String> {
    let ours = match message_id {
        b"invalid value for parameter \"%s\": \"%s\"" => {
            let s = INT_SETTINGS.iter().find(|s| names(message, s.name))?;
            // PostgreSQL's only hint here lists the units; then ours need not repeat them.
            int_allowed(s, old_hint.is_none())
        }
        b"parameter \"%s\" requires a Boolean value" if BOOL_SETTINGS.iter().any(|n| names(message, n)) => {
            BOOL_ALLOWED.to_string()
        }
        _ => return None,
    };
    Some(match old_hint {
        Some(old) if !old.is_empty() => format!("{old} {ours}"),
        _ => ours,
    })
}

/// Whether `message` names `setting` (followed by a quote, whichever a translation uses,
/// not by more of a longer name).
fn names(message: &str, setting: &CStr) -> bool {
    let name = setting.to_str().unwrap_or_default();
    message
        .match_indices(name)
        .any(|(at, _)| !message[at + name.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
}

fn int_allowed(s: &IntSetting, with_units: bool) -> String {
    match s.unit.words() {
        Some((symbol, units)) if with_units => format!(
            "Allowed values: whole numbers from {} to {} {symbol}; a unit may follow the number ({units}).",
            s.min, s.max
        ),
        Some((symbol, _)) => format!("Allowed values: whole numbers from {} to {} {symbol}.", s.min, s.max),
        None => format!("Allowed values: whole numbers from {} to {}.", s.min, s.max),
    }
}

/// A consistent snapshot of the settings, taken by the worker at start and reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub interval: u32,
    pub packet_wait_time: u32,
    pub buffer_size: u32,
    pub snaplen: u32,
    pub timeout_ms: u32,
    /// As configured; empty means "pick the default device".
    pub devices: Vec<String>,
    pub capture_loopback: bool,
    /// Extra ports besides the server's own.
    pub ports: Vec<u16>,
    pub method: CaptureMethod,
    pub flow_idle_timeout: u32,
    /// Seconds between saves of the state file; 0 = only at shutdown.
    pub save_interval: u32,
}

impl Settings {
    pub fn current() -> Settings {
        let devices = DEVICES
            .get()
            .and_then(|c| c.to_str().ok().map(str::to_string))
            .map(|s| parse_device_list(&s).unwrap_or_default())
            .unwrap_or_default();
        // The GUC machinery enforces the bounds, so the casts below cannot wrap.
        Settings {
            interval: INTERVAL.get().max(1) as u32,
            packet_wait_time: PACKET_WAIT_TIME.get().max(0) as u32,
            buffer_size: PCAP_BUFFER_SIZE.get().max(1) as u32,
            snaplen: PCAP_SNAPLEN.get().max(MIN_SNAPLEN) as u32,
            timeout_ms: PCAP_TIMEOUT.get().max(1) as u32,
            devices,
            capture_loopback: CAPTURE_LOOPBACK.get(),
            ports: PORTS.get().and_then(|c| c.to_str().ok().and_then(|t| parse_port_list(t).ok())).unwrap_or_default(),
            // SAFETY: a plain read of the GUC variable, in the process that owns it.
            method: CaptureMethod::from_i32(unsafe { CAPTURE_METHOD }),
            flow_idle_timeout: FLOW_IDLE_TIMEOUT.get().max(0) as u32,
            save_interval: SAVE_INTERVAL.get().max(0) as u32,
        }
    }
}

/// A comma-separated list setting: entries trimmed, none empty, none twice, at most
/// `max`. An empty (or all-blank) value is an empty list. Messages are fit for a GUC
/// error detail; `example` shows a well-formed list.
fn parse_list<T: PartialEq>(
    value: &str,
    example: &str,
    max: usize,
    parse: impl Fn(&str) -> Result<T, String>,
    twice: impl Fn(&str) -> String,
    too_many: impl Fn(usize) -> String,
) -> Result<Vec<T>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<T> = Vec::new();
    for (i, raw) in value.split(',').enumerate() {
        let text = raw.trim();
        if text.is_empty() {
            return Err(format!("Entry {} of the list is empty; write {example}.", i + 1));
        }
        let item = parse(text)?;
        if out.contains(&item) {
            return Err(twice(text));
        }
        out.push(item);
    }
    if out.len() > max {
        return Err(too_many(out.len()));
    }
    Ok(out)
}

/// Parses the `pg_netstat.devices` setting: interface names; empty means "choose for me".
pub fn parse_device_list(value: &str) -> Result<Vec<String>, String> {
    parse_list(
        value,
        "names separated by single commas, e.g. 'eth0,lo'",
        MAX_DEVICES,
        |name| {
            match valid_device_name(name) {
            true => Ok(name.to_string()),
            false => Err(format!(
                "\"{name}\" is not a valid network device name: 1 to {MAX_DEVICE_NAME} characters, no blanks, '/', ':' or ','."
            )),
        }
        },
        |name| format!("Device \"{name}\" is listed twice."),
        |n| format!("{n} devices are listed; at most {MAX_DEVICES} can be captured."),
    )
}

/// Parses `pg_netstat.ports`: extra TCP ports counted together with the server's own
/// port, e.g. a connection pooler's. Empty means none.
pub fn parse_port_list(value: &str) -> Result<Vec<u16>, String> {
    parse_list(
        value,
        "ports separated by single commas, e.g. '6432,6433'",
        MAX_PORTS - 1,
        |text| match text.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(format!("\"{text}\" is not a TCP port number (1 to 65535).")),
        },
        |port| format!("Port {port} is listed twice."),
        |n| format!("{n} ports are listed; at most {} can be added to the server's own port.", MAX_PORTS - 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists() {
        assert_eq!(parse_device_list(""), Ok(vec![]));
        assert_eq!(parse_device_list("  "), Ok(vec![]));
        assert_eq!(parse_device_list("eth0"), Ok(vec!["eth0".to_string()]));
        assert_eq!(parse_device_list(" eth0 , lo "), Ok(vec!["eth0".to_string(), "lo".to_string()]));
        assert!(parse_device_list("eth0,,lo").unwrap_err().contains("Entry 2"));
        assert!(parse_device_list("eth0,").unwrap_err().contains("empty"));
        assert!(parse_device_list("eth0,eth0").unwrap_err().contains("twice"));
        assert!(parse_device_list("a b").unwrap_err().contains("not a valid"));
        assert!(parse_device_list("averyveryverylongname").unwrap_err().contains("1 to 15"));
        let many: Vec<String> = (0..=MAX_DEVICES).map(|i| format!("d{i}")).collect();
        assert!(parse_device_list(&many.join(",")).unwrap_err().contains("at most 16"));
        assert_eq!(parse_device_list(&many[..MAX_DEVICES].join(",")).unwrap().len(), MAX_DEVICES);
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_port_list(""), Ok(vec![]));
        assert_eq!(parse_port_list(" 6432 , 7000"), Ok(vec![6432, 7000]));
        assert!(parse_port_list("6432,,7000").unwrap_err().contains("Entry 2"));
        assert!(parse_port_list("0").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("65536").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("pgbouncer").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("6432,6432").unwrap_err().contains("twice"));
        let many: Vec<String> = (1..=16).map(|i| (6000 + i).to_string()).collect();
        assert!(parse_port_list(&many.join(",")).unwrap_err().contains("at most 15"));
        assert_eq!(parse_port_list(&many[..15].join(",")).unwrap().len(), 15);
    }

    const INVALID: &[u8] = b"invalid value for parameter \"%s\": \"%s\"";

    #[test]
    fn an_unreadable_number_gets_its_bounds_and_units() {
        let hint = refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.interval": "ten""#, None);
        assert_eq!(
            hint.as_deref(),
            Some("Allowed values: whole numbers from 1 to 900000 s; a unit may follow the number (us, ms, s, min, h or d).")
        );
        let hint =
            refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.pcap_buffer_size": "3GB""#, None).unwrap();
        assert!(hint.contains("from 131070 to 1073741824 B") && hint.contains("kB, MB, GB or TB"), "{hint}");
        let hint = refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.max_flows": "lots""#, None);
        assert_eq!(hint.as_deref(), Some("Allowed values: whole numbers from 0 to 1048576."));
    }

    #[test]
    fn postgresqls_own_hint_is_kept_in_front() {
        let units = r#"Valid units for this parameter are "us", "ms", "s", "min", "h", and "d"."#;
        let hint =
            refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.pcap_timeout": "9 parsecs""#, Some(units));
        assert_eq!(hint, Some(format!("{units} Allowed values: whole numbers from 1 to 30000 ms.")));
    }

    #[test]
    fn a_boolean_gets_the_words_it_takes() {
        let id = b"parameter \"%s\" requires a Boolean value";
        let hint = refusal_hint(id, r#"parameter "pg_netstat.capture_loopback" requires a Boolean value"#, None);
        assert_eq!(hint.as_deref(), Some(BOOL_ALLOWED));
        let hint = refusal_hint(id, r#"parameter "pg_netstat.track_statements" requires a Boolean value"#, None);
        assert_eq!(hint.as_deref(), Some(BOOL_ALLOWED));
        assert_eq!(refusal_hint(id, r#"parameter "fsync" requires a Boolean value"#, None), None);
    }

    #[test]
    fn other_reports_are_left_alone() {
        // Other settings, settings whose check hooks give their own hint, other messages.
        assert_eq!(refusal_hint(INVALID, r#"invalid value for parameter "work_mem": "ten""#, None), None);
        assert_eq!(refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.devices": "lo,,x""#, None), None);
        assert_eq!(refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.interval_x": "1""#, None), None);
        assert_eq!(refusal_hint(b"%s", "pg_netstat.interval", None), None);
    }

    #[test]
    fn a_translated_message_is_recognised_by_the_name_alone() {
        let hint = refusal_hint(
            INVALID,
            "valeur invalide pour le paramètre « pg_netstat.packet_wait_time » : « bientôt »",
            None,
        );
        assert_eq!(
            hint.as_deref(),
            Some(
                "Allowed values: whole numbers from 1 to 60 s; a unit may follow the number (us, ms, s, min, h or d)."
            )
        );
    }

    #[test]
    fn every_numeric_setting_has_sane_bounds() {
        for s in &INT_SETTINGS {
            assert!(s.name.to_str().unwrap().starts_with("pg_netstat."));
            assert!(s.min <= s.max, "{:?}", s.name);
        }
    }
}
