//! Every `pg_netstat.*` setting: registration, bounds, validation and a typed snapshot.
//! All but `max_flows` and `history` are reloadable (PGC_SIGHUP): the worker re-reads them
//! on `pg_ctl reload`. Those two size shared memory and take a restart.
//!
//! Here: the settings' table, their registration and the snapshot the worker takes;
//! `checks`: the check hooks and the list parsers they use; `hints`: the log hook's part
//! that adds what is allowed to PostgreSQL's own refusals.

mod checks;
mod hints;

use checks::{check_capture_method, check_devices, check_ports};
pub use checks::{parse_device_list, parse_port_list};
pub use hints::on_report;

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

/// pg_netstat.track_statements, read once per statement: without `GucSetting::get`'s
/// thread check, which costs a thread-local lookup each time (issue 22's profile).
///
/// # Safety
/// On the thread PostgreSQL runs this process on (from a hook or callback), the only
/// one that sets the variable.
pub unsafe fn track_statements() -> bool {
    // SAFETY: by the caller's promise, no write runs while this reads.
    unsafe { *TRACK_STATEMENTS.as_ptr() }
}
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
        long: c"Sized in shared memory at server start (at most 144 bytes each). When full, the statement charged least recently is folded into its role's and database's 'other' row.",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/configuration.md's row of each numeric setting states the bounds the code
    /// defines, as "(MIN – MAX UNIT" (then ")" or "; ..."), and says **restart** exactly
    /// when the setting takes one: the table cannot drift from the code.
    #[test]
    fn the_settings_table_in_the_docs_states_the_codes_bounds() {
        let doc = include_str!("../../docs/configuration.md");
        let mut problems = Vec::new();
        for s in &INT_SETTINGS {
            let name = s.name.to_str().unwrap();
            let Some(row) = doc.lines().find(|l| l.starts_with(&format!("| `{name}` |"))) else {
                problems.push(format!("{name}: no row"));
                continue;
            };
            let bounds = match s.unit.words() {
                Some((symbol, _)) => format!("({} – {} {symbol}", s.min, s.max),
                None => format!("({} – {}", s.min, s.max),
            };
            if ![")", ";"].iter().any(|end| row.contains(&format!("{bounds}{end}"))) {
                problems.push(format!("{name}: the row does not say {bounds})"));
            }
            if row.contains("**restart**") != s.restart {
                problems
                    .push(format!("{name}: **restart** is {} in the row", if s.restart { "missing" } else { "wrong" }));
            }
        }
        assert!(problems.is_empty(), "docs/configuration.md: {problems:#?}");
    }
}
