//! A client's login, as the extension sees it: the ClientAuthentication hook (chained once
//! at _PG_init) and the moment the session has begun.
//!
//! Authentication succeeding is not yet a session: with `trust` or `cert` the role may
//! still not exist, the database may not exist, the role may not connect, the server may
//! be full; each ends the backend with a FATAL error. What a client claims before that is
//! not believed: its names never become rows of the role and database totals or of the
//! backends' per-connection figures (issue 29). So a backend records itself as its
//! session's owner, and starts counting its statements, at the commit of the transaction
//! that InitPostgres opens and closes once every check has passed (for a physical
//! walsender as for any other backend, in 15 to 18), and not before. A login that fails
//! records itself as it fails (here, or in the log hook for the FATALs after
//! authentication), and its traffic is counted under no name.

use crate::{net_raw, owner_hooks, stmt_hooks};
use pg_netstat_core::flows::OwnerStatus;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

// Registration at _PG_init: written there once, in the postmaster, before any child
// exists; only read afterwards.
static mut PREV_CLIENT_AUTH_HOOK: pg_sys::libpq::ClientAuthentication_hook_type = None;

/// Set when this backend authenticated; cleared when its session began.
static SESSION_PENDING: AtomicBool = AtomicBool::new(false);

/// Restricts CAP_NET_RAW in the postmaster (`net_raw`) and installs the authentication hook.
///
/// # Safety
/// From _PG_init only, once.
pub unsafe fn install() {
    net_raw::restrict_postmaster();
    // SAFETY: by the caller's promise: hook chaining during _PG_init in the postmaster,
    // before any backend exists.
    unsafe {
        PREV_CLIENT_AUTH_HOOK = pg_sys::libpq::ClientAuthentication_hook;
        pg_sys::libpq::ClientAuthentication_hook = Some(on_authentication);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_authentication(port: *mut pg_sys::libpq::be::Port, status: i32) {
    // Before anything the client can make this backend do, authenticated or not.
    if let Err(e) = net_raw::drop_here() {
        warning!("pg_netstat: could not drop CAP_NET_RAW in this backend: {e}");
    }
    if status == pg_sys::STATUS_OK as i32 {
        if !SESSION_PENDING.swap(true, Ordering::AcqRel) {
            // SAFETY: PostgreSQL's callback registration, in this backend, once.
            unsafe { pg_sys::RegisterXactCallback(Some(on_first_commit), std::ptr::null_mut()) };
        }
    } else {
        // Refused by pg_hba.conf, a wrong password, a client gone mid-exchange: recorded
        // under the names it claimed, for pg_netstat_connections only.
        // SAFETY: the hook's own Port, which lives as long as the backend.
        unsafe { owner_hooks::register(port, OwnerStatus::AuthFailed) };
    }
    // SAFETY: calling the hook that was installed before ours, with the same arguments.
    unsafe {
        if let Some(prev) = PREV_CLIENT_AUTH_HOOK {
            prev(port, status);
        }
    }
}

/// The first commit after authentication ends InitPostgres: the session has begun.
/// (Registered for the backend's life: every later commit costs one atomic read here,
/// and no guard, which is why the work of the first is in a function of its own.)
unsafe extern "C-unwind" fn on_first_commit(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if event == pg_sys::XactEvent::XACT_EVENT_COMMIT && SESSION_PENDING.load(Ordering::Relaxed) {
        session_begun();
    }
}

#[pg_guard]
extern "C-unwind" fn session_begun() {
    if !SESSION_PENDING.swap(false, Ordering::AcqRel) {
        return;
    }
    // SAFETY: a plain read of this backend's Port, set before authentication.
    let port = unsafe { pg_sys::libpq::be::MyProcPort };
    // SAFETY: this backend's Port (or NULL), which lives as long as the backend.
    unsafe {
        owner_hooks::register(port, OwnerStatus::Authenticated);
        stmt_hooks::session_begun(port);
    }
}
