//! pg_netstat: how much network traffic the server's own port moves, per device and
//! interval, captured in the kernel by a background worker. See README.md.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

pub mod capture;
pub mod stats;

mod gucs;
mod shmem;
mod sql;
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
    gucs::init();
    shmem::init();
    worker::register();
}
