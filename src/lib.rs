use pgrx::prelude::*;
::pgrx::pg_module_magic!();
pub mod capture;
pub mod stats;

#[pg_extern]
fn pg_netstat_probe() -> i64 { 1 }
