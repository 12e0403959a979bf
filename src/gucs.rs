//! Every `pg_netstat.*` setting: registration, bounds, validation and a typed snapshot.
//! All but `max_flows` are reloadable (PGC_SIGHUP): the worker re-reads them on
//! `pg_ctl reload`. `max_flows` sizes shared memory and takes a restart.

use crate::capture::{parse_device_list, parse_port_list, CaptureMethod};
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

pub fn init() {
    GucRegistry::define_int_guc(
        c"pg_netstat.interval",
        c"Length of one statistics interval.",
        c"Packets are counted in wall-clock-aligned intervals of this length; each device keeps the last 60.",
        &INTERVAL,
        1,
        900_000,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_netstat.packet_wait_time",
        c"How long after its end an interval stays open for packets still in the kernel.",
        c"Must exceed pg_netstat.pcap_timeout, the longest the kernel holds a partly filled ring block.",
        &PACKET_WAIT_TIME,
        1,
        60,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_netstat.pcap_buffer_size",
        c"Capture buffer size per device.",
        c"Size of each device's TPACKET_V3 ring (rounded up to whole blocks). Memory outside shared_buffers.",
        &PCAP_BUFFER_SIZE,
        131_070,
        1 << 30,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"pg_netstat.pcap_snaplen",
        c"Bytes of each packet copied for header parsing.",
        c"Only headers are parsed; payload is never read or kept. Lengths are counted from the original packet.",
        &PCAP_SNAPLEN,
        MIN_SNAPLEN,
        65_535,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"pg_netstat.pcap_timeout",
        c"Longest time the kernel holds a partly filled capture block.",
        c"Becomes the ring's block retire timeout.",
        &PCAP_TIMEOUT,
        1,
        30_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
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
    GucRegistry::define_int_guc(
        c"pg_netstat.max_flows",
        c"Most TCP connections tracked at once for the per-connection, role and database views.",
        c"Sized in shared memory at server start; 0 turns per-connection accounting off. When full, closed and then least recently seen connections are folded into the role and database totals to make room.",
        &MAX_FLOWS,
        0,
        1 << 20,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_netstat.flow_idle_timeout",
        c"A connection with no packets for this long is folded into the role and database totals.",
        c"0 keeps idle connections until the table needs their place.",
        &FLOW_IDLE_TIMEOUT,
        0,
        i32::MAX / 1000,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    reserve_prefix();
}

#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17", feature = "pg18"))]
fn reserve_prefix() {
    // SAFETY: plain call with a static C string, during _PG_init.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"pg_netstat".as_ptr()) }
}

#[cfg(any(feature = "pg13", feature = "pg14"))]
fn reserve_prefix() {
    // SAFETY: as above; the pre-15 spelling only warns about unknown names.
    unsafe { pg_sys::EmitWarningsOnPlaceholders(c"pg_netstat".as_ptr()) }
}

/// GUC check hooks: a malformed list is rejected before it takes effect, so a bad
/// `pg_ctl reload` keeps the old value (PostgreSQL logs our detail) and `ALTER SYSTEM`
/// fails with it.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_devices(newval: *mut *mut c_char, _extra: *mut *mut c_void, _source: pg_sys::GucSource::Type) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the candidate value.
    unsafe { check_list(newval, |t| parse_device_list(t).map(|_| ())) }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_ports(newval: *mut *mut c_char, _extra: *mut *mut c_void, _source: pg_sys::GucSource::Type) -> bool {
    // SAFETY: as above.
    unsafe { check_list(newval, |t| parse_port_list(t).map(|_| ())) }
}

unsafe fn check_list(newval: *mut *mut c_char, parse: impl Fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: the caller passes PostgreSQL's pointer to the candidate value (NULL allowed).
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval)
    };
    let Ok(text) = value.to_str() else {
        set_check_detail("The value is not valid UTF-8.");
        return false;
    };
    match parse(text) {
        Ok(()) => true,
        Err(detail) => {
            set_check_detail(&detail);
            false
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_capture_method(newval: *mut std::ffi::c_int, _extra: *mut *mut c_void, _source: pg_sys::GucSource::Type) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the candidate value.
    let value = unsafe { *newval };
    if value == CaptureMethod::Pcap as i32 && !CaptureMethod::PCAP_BUILT_IN {
        set_check_detail("This build of pg_netstat has no libpcap backend.");
        set_check_hint("Build it with the pcap feature (needs libpcap-dev): cargo pgrx install --release --features pcap");
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
            ports: PORTS
                .get()
                .and_then(|c| c.to_str().ok().and_then(|t| parse_port_list(t).ok()))
                .unwrap_or_default(),
            // SAFETY: a plain read of the GUC variable, in the process that owns it.
            method: CaptureMethod::from_i32(unsafe { CAPTURE_METHOD }),
            flow_idle_timeout: FLOW_IDLE_TIMEOUT.get().max(0) as u32,
        }
    }
}
