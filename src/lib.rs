//! pg_netstat: how much network traffic the server's own port moves, per device and
//! interval, captured in the kernel by a background worker. See README.md.
//!
//! This crate is the PostgreSQL glue: the worker, the backends' hooks, shared memory,
//! SQL, settings. What counts, free of PostgreSQL, is the core crate, `pg_netstat_core`
//! (crates/core), used here by that name.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

mod flowshm;
mod gucs;
mod log_hook;
mod owner_hooks;
mod persist;
mod region;
mod shmem;
mod sql;
mod stmt_hooks;
mod stmtshm;
mod worker;

::pgrx::pg_module_magic!();

::pgrx::extension_sql_file!("../sql/finalize.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a flag the postmaster sets while loading preload libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_netstat must be loaded via shared_preload_libraries",
            "_PG_init",
        )
        .set_detail("The capture worker and its shared memory can only be set up when the server starts.")
        .set_hint("Add pg_netstat to shared_preload_libraries in postgresql.conf and restart the server.")
        .report(PgLogLevel::ERROR);
    }
    // SAFETY: here is _PG_init, which the postmaster runs once. First, so that a bad value
    // in postgresql.conf, refused while the settings are defined, is already logged with
    // what is allowed (`gucs::on_report`).
    unsafe { log_hook::install() };
    gucs::init();
    // SAFETY: plain reads of settings the postmaster has loaded before preload libraries.
    let connections = unsafe { pg_sys::MaxConnections + pg_sys::max_wal_senders }.max(1) as usize;
    // SAFETY: here is _PG_init, in the postmaster, which runs it once.
    unsafe {
        shmem::init(gucs::HISTORY.get().max(1) as usize);
        flowshm::init(gucs::MAX_FLOWS.get().max(0) as usize);
        stmtshm::init(gucs::MAX_STATEMENTS.get().max(1) as usize, connections);
    }
    // SAFETY: as above.
    unsafe { stmt_hooks::install() };
    worker::register();
    least_privilege();
}

/// Only the capture worker needs CAP_NET_RAW. The postmaster keeps it permitted only
/// (children start without it in effect, programs they run never get it); client
/// backends drop it for good as they authenticate; the worker raises it when it starts.
/// No other capability is touched: this runs before the postmaster opens its listen
/// sockets, which may need CAP_NET_BIND_SERVICE. Linux-native builds only: the portable
/// build changes no privilege and says so in the log.
fn least_privilege() {
    #[cfg(linux_native)]
    if let Err(e) = pg_netstat_core::privileges::postmaster_keep_net_raw_permitted_only() {
        warning!("pg_netstat: could not restrict CAP_NET_RAW in the postmaster: {e}");
    }
    #[cfg(not(linux_native))]
    log!(
        "pg_netstat: this build (libpcap only, no Linux capability handling) does not restrict capture \
         privileges: every server process keeps whatever privilege the server was started with"
    );
    // SAFETY: hook chaining during _PG_init in the postmaster, before any backend exists.
    unsafe {
        PREV_CLIENT_AUTH_HOOK = pg_sys::libpq::ClientAuthentication_hook;
        pg_sys::libpq::ClientAuthentication_hook = Some(drop_privileges_on_auth);
    }
}

static mut PREV_CLIENT_AUTH_HOOK: pg_sys::libpq::ClientAuthentication_hook_type = None;

#[pg_guard]
unsafe extern "C-unwind" fn drop_privileges_on_auth(port: *mut pg_sys::libpq::be::Port, status: i32) {
    // Before anything the client can make this backend do, authenticated or not.
    #[cfg(linux_native)]
    if let Err(e) = pg_netstat_core::privileges::drop_net_raw() {
        warning!("pg_netstat: could not drop CAP_NET_RAW in this backend: {e}");
    }
    // Who this connection is, for pg_netstat_connections / _roles / _databases.
    let outcome = if status == pg_sys::STATUS_OK as i32 {
        pg_netstat_core::flows::OwnerStatus::Authenticated
    } else {
        pg_netstat_core::flows::OwnerStatus::AuthFailed
    };
    // SAFETY: the hook's own Port, which lives as long as the backend.
    unsafe {
        owner_hooks::register(port, outcome);
        if status == pg_sys::STATUS_OK as i32 {
            stmt_hooks::authenticated(port);
        }
    }
    // SAFETY: calling the hook that was installed before ours, with the same arguments.
    unsafe {
        if let Some(prev) = PREV_CLIENT_AUTH_HOOK {
            prev(port, status);
        }
    }
}
