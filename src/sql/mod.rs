//! SQL entry points. They only read shared memory; the views and grants are in sql/.
//! Here: what every function shares (the result-column check, value conversions) and
//! the two that act (reset, worker error); the rest by family of views: `devices`
//! (intervals and capture state), `flows` (connections, owners, totals, egress),
//! `statements` (statements, per-connection socket figures, applications).

// pgrx states a set-returning function's columns as a tuple of name!() types in its
// signature: that tuple is the column list, not a type to factor out.
#![allow(clippy::type_complexity)]

use crate::flowshm;
use crate::gucs::Settings;
use crate::persist;
use crate::shmem::{self, DeviceState, INJECT_ERROR, STATE, WORKER_EXITED_US, WORKER_PID};
use crate::stmtshm;
use pg_netstat_core::capture::CaptureMethod;
use pg_netstat_core::counters::align;
use pg_netstat_core::flows::{name_str, Flow, Totals};
use pg_netstat_core::history::Slot;
use pg_netstat_core::peer::{self, BackendKind};
use pg_netstat_core::statements::conns::{self, AppKey, Conn};
use pg_netstat_core::statements::Kind;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use std::sync::atomic::Ordering;

/// Unix microseconds to PostgreSQL's timestamptz (microseconds since 2000-01-01 UTC).
fn timestamptz(unix_us: i64) -> TimestampWithTimeZone {
    const PG_EPOCH_OFFSET_US: i64 = 946_684_800 * 1_000_000;
    TimestampWithTimeZone::try_from(unix_us - PG_EPOCH_OFFSET_US)
        .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity())
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A result column as the library builds it: name and type.
type Column = (&'static str, pg_sys::Oid);

/// The PostgreSQL type a result column of this Rust type has in the catalog.
trait ColumnType {
    const OID: pg_sys::Oid;
}

impl ColumnType for String {
    const OID: pg_sys::Oid = pg_sys::TEXTOID;
}

impl ColumnType for i64 {
    const OID: pg_sys::Oid = pg_sys::INT8OID;
}

impl ColumnType for i32 {
    const OID: pg_sys::Oid = pg_sys::INT4OID;
}

impl ColumnType for f64 {
    const OID: pg_sys::Oid = pg_sys::FLOAT8OID;
}

impl ColumnType for TimestampWithTimeZone {
    const OID: pg_sys::Oid = pg_sys::TIMESTAMPTZOID;
}

impl<T: ColumnType> ColumnType for Option<T> {
    const OID: pg_sys::Oid = T::OID;
}

/// A set-returning function whose result columns are written once, as `name: Type`
/// pairs: from them come both the `name!()` tuple pgrx turns into the SQL definition and
/// the list `check_result_columns` holds the catalog to, so the two cannot drift.
macro_rules! rows_fn {
    (
        $(#[$attr:meta])*
        fn $f:ident($($arg:ident: $argty:ty),* $(,)?) -> rows($($col:ident: $t:ty),* $(,)?) $body:block
    ) => {
        $(#[$attr])*
        #[pg_extern(volatile, parallel_restricted)]
        fn $f($($arg: $argty,)* fcinfo: pg_sys::FunctionCallInfo) -> TableIterator<'static, ($(name!($col, $t),)*)> {
            check_result_columns(fcinfo, stringify!($f), &[$((stringify!($col), <$t as ColumnType>::OID)),*]);
            $body
        }
    };
}

/// Refuses to run when the SQL definition that called us does not match what this
/// library returns. It happens between installing a newer package and `ALTER EXTENSION
/// pg_netstat UPDATE`: the catalog still holds the old function, the new library is
/// loaded. PostgreSQL builds the rows from the catalog's column list, so a reordered or
/// retyped column would read one value as another. An older definition whose columns are
/// a prefix of ours (new versions only append) gets exactly the columns it asks for.
fn check_result_columns(fcinfo: pg_sys::FunctionCallInfo, function: &str, columns: &[Column]) {
    let mut tupdesc: pg_sys::TupleDesc = std::ptr::null_mut();
    let mut type_oid = pg_sys::Oid::INVALID;
    // SAFETY: fcinfo is the call's own, passed by PostgreSQL through pgrx.
    let class = unsafe { pg_sys::get_call_result_type(fcinfo, &mut type_oid, &mut tupdesc) };
    let mismatch = if class != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || tupdesc.is_null() {
        Some("it is not declared to return rows of columns".to_string())
    } else {
        // SAFETY: get_call_result_type returned a valid descriptor for this call.
        let desc = unsafe { PgTupleDesc::from_pg_unchecked(tupdesc) };
        if desc.len() > columns.len() {
            Some(format!("it declares {} columns, this library returns {}", desc.len(), columns.len()))
        } else {
            (0..desc.len()).find_map(|i| {
                let att = desc.get(i)?;
                let (name, oid) = columns[i];
                (att.is_dropped() || att.name() != name || att.atttypid != oid).then(|| {
                    format!(
                        "its column {} is \"{}\" of type {}, this library returns \"{}\" of type {}",
                        i + 1,
                        att.name(),
                        u32::from(att.atttypid),
                        name,
                        u32::from(oid)
                    )
                })
            })
        }
    };
    if let Some(why) = mismatch {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("the SQL definition of {function}() does not match the pg_netstat library (version {})", env!("CARGO_PKG_VERSION")),
            "check_result_columns",
        )
        .set_detail(format!("In the catalog, {why}."))
        .set_hint("Run ALTER EXTENSION pg_netstat UPDATE in this database, or install the package that matches the extension's version.")
        .report(PgLogLevel::ERROR);
    }
}

mod devices;
mod flows;
mod statements;
mod viewer;

use viewer::Viewer;

/// Makes the capture worker raise an ERROR at its next wake-up, so an operator (or a
/// test) can see it restarted and capture resumed. Superuser only. Returns the PID of
/// the worker that was asked, or NULL when no worker is running.
#[pg_extern(volatile, parallel_unsafe)]
fn pg_netstat_inject_worker_error() -> Option<i32> {
    let pid = WORKER_PID.get().load(Ordering::Acquire);
    if pid <= 0 {
        return None;
    }
    INJECT_ERROR.get().store(true, Ordering::Release);
    // SIGHUP wakes the worker's latch; the reload it also causes changes nothing.
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    (rc == 0).then_some(pid)
}

fn addr_text(a: &[u8; 16], ipv6: bool) -> String {
    if ipv6 {
        std::net::Ipv6Addr::from(*a).to_string()
    } else {
        std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
    }
}

fn opt_name(n: &[u8]) -> Option<String> {
    let s = name_str(n);
    (!s.is_empty()).then(|| s.to_string())
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Starts the cumulative figures again from zero: role and database totals, the
/// flow table's eviction counters, and the per-device totals of pg_netstat_devices.
/// Per-connection figures (since each connection began) and the interval history are
/// not touched: they describe windows, not running sums. Like pg_stat_reset(), only
/// superusers may call it unless granted.
#[pg_extern(volatile, parallel_unsafe)]
fn pg_netstat_reset() {
    persist::reset_counts(now_us());
}
