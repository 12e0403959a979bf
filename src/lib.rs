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
mod login;
mod net_raw;
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
    // SAFETY: as above.
    unsafe { login::install() };
}
