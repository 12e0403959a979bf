//! The backend side of per-connection accounting (the registry itself is flows/owners.rs):
//! each TCP backend records who it is (role, database, PID) under its client address and
//! port once its session has begun (`login`), or as it is refused, and marks the record
//! ended when it exits. A refused login's names go to the connection's own row only: the
//! table counts its traffic under no name (`UNAUTHENTICATED_ROW`). The record goes to the flows already captured for it at once, and to flows
//! captured later when they appear, so a flow keeps its role and database after the
//! backend is gone.

use crate::flowshm;
use pg_netstat_core::flows::{name_bytes, Owner, OwnerKey, OwnerStatus};
use pg_netstat_core::peer::BackendKind;
use pgrx::pg_sys;
use pgrx::pg_sys::libpq::be::Port;
use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once this backend has a record, and once its exit callback is registered.
static REGISTERED: AtomicBool = AtomicBool::new(false);
static EXIT_HOOKED: AtomicBool = AtomicBool::new(false);
thread_local! {
    /// This backend's connection, for its exit callback (a backend runs on one thread).
    static MY_KEY: std::cell::Cell<Option<OwnerKey>> = const { std::cell::Cell::new(None) };
}

/// The start of PostgreSQL's `Port` (libpq/libpq-be.h), up to the fields read here, as
/// each major lays it out. pgrx's own `Port` is wrong for 17 (it keeps
/// `canAcceptConnections`, which 17 removed), so the role came out as the database and the
/// database as nothing; this is read instead, and the fields before these never moved.
#[repr(C)]
struct PortHead {
    sock: pg_sys::pgsocket,
    noblock: bool,
    proto: pg_sys::ProtocolVersion,
    laddr: pg_sys::SockAddr,
    raddr: pg_sys::SockAddr,
    remote_host: *mut c_char,
    remote_hostname: *mut c_char,
    remote_hostname_resolv: c_int,
    remote_hostname_errcode: c_int,
    remote_port: *mut c_char,
    /// `CAC_state` (an enum) in 15 and 16; moved out of `Port` in 17.
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    can_accept_connections: c_int,
    /// New in 18: the local address as text.
    #[cfg(feature = "pg18")]
    local_host: [c_char; 64],
    database_name: *mut c_char,
    user_name: *mut c_char,
    cmdline_options: *mut c_char,
    guc_options: *mut pg_sys::List,
    /// application_name as the startup packet gave it (the same place in 15 to 18).
    application_name: *mut c_char,
}

/// Address family, address (IPv4 in the first 4 bytes; IPv4-mapped IPv6 as IPv4, which
/// is how the packets carry it) and port of a socket address; `None` for Unix sockets.
fn inet(sa: &pg_sys::SockAddr) -> Option<([u8; 16], u16, bool)> {
    let family = sa.addr.ss_family as i32;
    let p = &sa.addr as *const pg_sys::sockaddr_storage;
    let mut addr = [0u8; 16];
    if family == libc::AF_INET {
        // SAFETY: ss_family says this storage holds a sockaddr_in.
        let sin = unsafe { &*(p as *const libc::sockaddr_in) };
        addr[..4].copy_from_slice(&sin.sin_addr.s_addr.to_ne_bytes());
        Some((addr, u16::from_be(sin.sin_port), false))
    } else if family == libc::AF_INET6 {
        // SAFETY: ss_family says this storage holds a sockaddr_in6.
        let sin6 = unsafe { &*(p as *const libc::sockaddr_in6) };
        let a = sin6.sin6_addr.s6_addr;
        let port = u16::from_be(sin6.sin6_port);
        if a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff {
            addr[..4].copy_from_slice(&a[12..]);
            Some((addr, port, false))
        } else {
            Some((a, port, true))
        }
    } else {
        None
    }
}

/// The bytes of a C string, or none for NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that lives and stays unchanged for `'a`.
unsafe fn cstr_bytes<'a>(p: *const std::ffi::c_char) -> &'a [u8] {
    if p.is_null() {
        b""
    } else {
        // SAFETY: by the caller's promise.
        unsafe { CStr::from_ptr(p).to_bytes() }
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// The names and client address of a TCP connection as its startup packet and socket
/// gave them (the backends' own per-connection figures key on these); `None` for Unix
/// sockets.
///
/// # Safety
/// `port` is NULL or this backend's Port (MyProcPort, or the one the authentication hook
/// was given), which lives as long as the backend.
pub(crate) unsafe fn describe(port: *const Port) -> Option<AppKeyParts> {
    if port.is_null() {
        return None;
    }
    // SAFETY: by the caller's promise; PortHead is the layout of its first fields in the
    // major this library was built for, and its strings live as long as it.
    let port = unsafe { &*(port as *const PortHead) };
    let (client_addr, client_port, ipv6) = inet(&port.raddr)?;
    Some(AppKeyParts {
        // SAFETY: the Port's strings, as above.
        role: name_bytes(unsafe { cstr_bytes(port.user_name) }),
        // SAFETY: as above.
        database: name_bytes(unsafe { cstr_bytes(port.database_name) }),
        // SAFETY: as above.
        application: name_bytes(unsafe { cstr_bytes(port.application_name) }),
        client_addr,
        client_port,
        ipv6,
    })
}

pub(crate) struct AppKeyParts {
    pub role: [u8; pg_netstat_core::flows::NAME_LEN],
    pub database: [u8; pg_netstat_core::flows::NAME_LEN],
    pub application: [u8; pg_netstat_core::flows::NAME_LEN],
    pub client_addr: [u8; 16],
    pub client_port: u16,
    pub ipv6: bool,
}

/// Records this backend's connection, once: by `login`, as authentication fails or once
/// the session has begun.
///
/// # Safety
/// As `describe`.
pub unsafe fn register(port: *const Port, status: OwnerStatus) {
    if REGISTERED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: by the caller's promise.
    unsafe { record(port, status) };
}

/// Writes (or rewrites, for a backend refused after it authenticated: unknown role or
/// database) this backend's record.
///
/// # Safety
/// As `describe`.
unsafe fn record(port: *const Port, status: OwnerStatus) {
    if !flowshm::enabled() || port.is_null() {
        return;
    }
    REGISTERED.store(true, Ordering::Release);
    // SAFETY: by the caller's promise, as in `describe`.
    let port = unsafe { &*(port as *const PortHead) };
    let (Some((client_addr, client_port, ipv6)), Some((server_addr, server_port, _))) =
        (inet(&port.raddr), inet(&port.laddr))
    else {
        return;
    };
    let key = OwnerKey { client_addr, client_port, server_port, ipv6 };
    let now = now_us();
    let ended = status != OwnerStatus::Authenticated;
    let owner = Owner {
        in_use: true,
        key,
        status,
        // SAFETY: a plain read of this process's PID.
        pid: unsafe { pg_sys::MyProcPid },
        // SAFETY: the Port's strings, as above.
        role: name_bytes(unsafe { cstr_bytes(port.user_name) }),
        // SAFETY: as above.
        database: name_bytes(unsafe { cstr_bytes(port.database_name) }),
        // SAFETY: as above.
        application: name_bytes(unsafe { cstr_bytes(port.application_name) }),
        // SAFETY: a plain read of a flag set from the startup packet, before authentication.
        kind: if unsafe { pg_sys::am_walsender } { BackendKind::WalSender } else { BackendKind::Client },
        started_us: now,
        // A refused backend is about to exit.
        ended_us: if ended { now } else { 0 },
        ..Owner::default()
    };
    // O(number of captured devices) under the lock: never a scan of the table, so a
    // flood of connections cannot make logins wait on each other here.
    flowshm::write(|t| t.register_owner(owner, server_addr));
    if !ended && !EXIT_HOOKED.swap(true, Ordering::AcqRel) {
        let _ = MY_KEY.try_with(|k| k.set(Some(key)));
        // SAFETY: PostgreSQL's callback registration, in the backend, once.
        unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    let Some(key) = MY_KEY.try_with(|k| k.get()).ok().flatten() else { return };
    // SAFETY: a plain read of this process's PID.
    let pid = unsafe { pg_sys::MyProcPid };
    flowshm::write(|t| t.end_owner(&key, pid, now_us()));
}

/// The owners' part of the log hook (`log_hook`). A connection refused while it starts
/// (pg_hba.conf "reject" or no line, wrong password, unknown role or database, too many
/// clients) ends in a FATAL with one of these codes: record it then, with the role and
/// database it asked for. Nothing while this backend holds the flows lock (the report
/// came from inside our own work there: it would wait for itself).
pub fn on_report(edata: &pg_sys::ErrorData) {
    use pgrx::PgSqlErrorCode as E;
    if edata.elevel != pg_sys::FATAL as i32 || flowshm::held_by_me() {
        return;
    }
    // SAFETY: plain reads of this backend's globals.
    let (port, proc_) = unsafe { (pg_sys::libpq::be::MyProcPort, pg_sys::MyProc) };
    if port.is_null() || proc_.is_null() {
        return;
    }
    let code = edata.sqlerrcode;
    let status = if code == E::ERRCODE_INVALID_PASSWORD as i32 {
        OwnerStatus::AuthFailed
    } else if [
        E::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        E::ERRCODE_INVALID_CATALOG_NAME, // 3D000, "database does not exist"
        E::ERRCODE_TOO_MANY_CONNECTIONS,
    ]
    .iter()
    .any(|c| *c as i32 == code)
    {
        OwnerStatus::Rejected
    } else {
        return;
    };
    // SAFETY: MyProcPort, valid for the backend's life.
    unsafe { record(port, status) };
}
