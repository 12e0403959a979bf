//! SQL entry points. They only read shared memory; the view and grants are in sql/.

// pgrx states a set-returning function's columns as a tuple of name!() types in its
// signature: that tuple is the column list, not a type to factor out.
#![allow(clippy::type_complexity)]

use crate::capture::CaptureMethod;
use crate::counters::align;
use crate::flows::{name_str, Flow, Totals};
use crate::flowshm;
use crate::gucs::Settings;
use crate::shmem::{Slot, INJECT_ERROR, STATE, WORKER_PID};
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

const TEXT: pg_sys::Oid = pg_sys::TEXTOID;
const TSTZ: pg_sys::Oid = pg_sys::TIMESTAMPTZOID;
const INT8: pg_sys::Oid = pg_sys::INT8OID;
const INT4: pg_sys::Oid = pg_sys::INT4OID;

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

const PG_NETSTAT_HISTORY_COLUMNS: &[Column] = &[
    ("device", TEXT),
    ("ts", TSTZ),
    ("packets_in", INT8),
    ("packets_out", INT8),
    ("packets_in_speed", INT8),
    ("packets_out_speed", INT8),
    ("bytes_in", INT8),
    ("bytes_out", INT8),
    ("bytes_in_speed", INT8),
    ("bytes_out_speed", INT8),
    ("created_at", TSTZ),
];

/// Every closed interval of every captured device; the `pg_netstat` view orders it.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_history(
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(device, String),
        name!(ts, TimestampWithTimeZone),
        name!(packets_in, i64),
        name!(packets_out, i64),
        name!(packets_in_speed, i64),
        name!(packets_out_speed, i64),
        name!(bytes_in, i64),
        name!(bytes_out, i64),
        name!(bytes_in_speed, i64),
        name!(bytes_out_speed, i64),
        name!(created_at, TimestampWithTimeZone),
    ),
> {
    check_result_columns(fcinfo, "pg_netstat_history", PG_NETSTAT_HISTORY_COLUMNS);
    let row = |device: &str, s: &Slot| {
        let secs = s.secs.max(1) as u64;
        let c = s.counters;
        (
            device.to_string(),
            timestamptz(s.start * 1_000_000),
            as_i64(c.packets_in),
            as_i64(c.packets_out),
            as_i64(c.packets_in / secs),
            as_i64(c.packets_out / secs),
            as_i64(c.bytes_in),
            as_i64(c.bytes_out),
            as_i64(c.bytes_in / secs),
            as_i64(c.bytes_out / secs),
            timestamptz(s.created_at_us),
        )
    };
    let rows: Vec<_> = {
        let shared = STATE.share();
        shared.devices.iter().filter(|d| d.in_use).flat_map(|d| d.history().map(move |s| row(d.name(), s))).collect()
    };
    TableIterator::new(rows)
}

const PG_NETSTAT_DEVICE_STATUS_COLUMNS: &[Column] = &[
    ("device", TEXT),
    ("capture_method", TEXT),
    ("state", TEXT),
    ("state_since", TSTZ),
    ("packets_in", INT8),
    ("packets_out", INT8),
    ("bytes_in", INT8),
    ("bytes_out", INT8),
    ("kernel_drops", INT8),
    ("ring_freezes", INT8),
    ("last_error", TEXT),
];

/// Capture status per device: whether it is counting, and if not, why.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_device_status(
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(device, String),
        name!(capture_method, String),
        name!(state, String),
        name!(state_since, TimestampWithTimeZone),
        name!(packets_in, i64),
        name!(packets_out, i64),
        name!(bytes_in, i64),
        name!(bytes_out, i64),
        name!(kernel_drops, i64),
        name!(ring_freezes, i64),
        name!(last_error, Option<String>),
    ),
> {
    check_result_columns(fcinfo, "pg_netstat_device_status", PG_NETSTAT_DEVICE_STATUS_COLUMNS);
    let rows: Vec<_> = {
        let shared = STATE.share();
        shared
            .devices
            .iter()
            .filter(|d| d.in_use)
            .map(|d| {
                let err = d.last_error();
                (
                    d.name().to_string(),
                    CaptureMethod::from_i32(d.method as i32).as_str().to_string(),
                    d.state.as_str().to_string(),
                    timestamptz(d.state_since_us),
                    as_i64(d.total.packets_in.saturating_sub(d.total_base.packets_in)),
                    as_i64(d.total.packets_out.saturating_sub(d.total_base.packets_out)),
                    as_i64(d.total.bytes_in.saturating_sub(d.total_base.bytes_in)),
                    as_i64(d.total.bytes_out.saturating_sub(d.total_base.bytes_out)),
                    as_i64(d.kernel_drops),
                    as_i64(d.ring_freezes),
                    (!err.is_empty()).then(|| err.to_string()),
                )
            })
            .collect()
    };
    TableIterator::new(rows)
}

const PG_NETSTAT_INTERVAL_HISTORY_COLUMNS: &[Column] = &[
    ("device", TEXT),
    ("ts", TSTZ),
    ("interval_seconds", INT4),
    ("packets_in", INT8),
    ("packets_out", INT8),
    ("bytes_in", INT8),
    ("bytes_out", INT8),
    ("kernel_drops", INT8),
    ("late_packets", INT8),
    ("created_at", TSTZ),
    ("connection_attempts", INT8),
    ("resets_in", INT8),
    ("resets_out", INT8),
    ("retransmits_in", INT8),
    ("retransmits_out", INT8),
    ("zero_windows_in", INT8),
    ("zero_windows_out", INT8),
    ("out_of_order_in", INT8),
    ("out_of_order_out", INT8),
];

/// Every closed interval with what the compatible view leaves out: its own length (it
/// changes when pg_netstat.interval is reloaded), packets the kernel dropped, and
/// packets counted late.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_interval_history(
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(device, String),
        name!(ts, TimestampWithTimeZone),
        name!(interval_seconds, i32),
        name!(packets_in, i64),
        name!(packets_out, i64),
        name!(bytes_in, i64),
        name!(bytes_out, i64),
        name!(kernel_drops, i64),
        name!(late_packets, i64),
        name!(created_at, TimestampWithTimeZone),
        name!(connection_attempts, i64),
        name!(resets_in, i64),
        name!(resets_out, i64),
        name!(retransmits_in, i64),
        name!(retransmits_out, i64),
        name!(zero_windows_in, i64),
        name!(zero_windows_out, i64),
        name!(out_of_order_in, i64),
        name!(out_of_order_out, i64),
    ),
> {
    check_result_columns(fcinfo, "pg_netstat_interval_history", PG_NETSTAT_INTERVAL_HISTORY_COLUMNS);
    let row = |device: &str, s: &Slot| {
        let t = s.tcp;
        (
            device.to_string(),
            timestamptz(s.start * 1_000_000),
            i32::try_from(s.secs).unwrap_or(i32::MAX),
            as_i64(s.counters.packets_in),
            as_i64(s.counters.packets_out),
            as_i64(s.counters.bytes_in),
            as_i64(s.counters.bytes_out),
            as_i64(s.kernel_drops),
            as_i64(s.late),
            timestamptz(s.created_at_us),
            as_i64(t.syn),
            as_i64(t.rst_in),
            as_i64(t.rst_out),
            as_i64(t.retrans_in),
            as_i64(t.retrans_out),
            as_i64(t.zero_window_in),
            as_i64(t.zero_window_out),
            as_i64(t.ooo_in),
            as_i64(t.ooo_out),
        )
    };
    let rows: Vec<_> = {
        let shared = STATE.share();
        shared.devices.iter().filter(|d| d.in_use).flat_map(|d| d.history().map(move |s| row(d.name(), s))).collect()
    };
    TableIterator::new(rows)
}

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

const PG_NETSTAT_FLOWS_COLUMNS: &[Column] = &[
    ("device", TEXT),
    ("client_addr", TEXT),
    ("client_port", INT4),
    ("server_addr", TEXT),
    ("server_port", INT4),
    ("pid", INT4),
    ("role", TEXT),
    ("database", TEXT),
    ("auth", TEXT),
    ("packets_in", INT8),
    ("packets_out", INT8),
    ("bytes_in", INT8),
    ("bytes_out", INT8),
    ("interval_start", TSTZ),
    ("interval_packets_in", INT8),
    ("interval_packets_out", INT8),
    ("interval_bytes_in", INT8),
    ("interval_bytes_out", INT8),
    ("fins_in", INT8),
    ("fins_out", INT8),
    ("resets_in", INT8),
    ("resets_out", INT8),
    ("retransmits_in", INT8),
    ("retransmits_out", INT8),
    ("zero_windows_in", INT8),
    ("zero_windows_out", INT8),
    ("out_of_order_in", INT8),
    ("out_of_order_out", INT8),
    ("state", TEXT),
    ("first_seen", TSTZ),
    ("last_seen", TSTZ),
    ("closed_at", TSTZ),
];

/// Every TCP connection the worker is tracking, with what the backends told about
/// themselves. `pg_netstat_connections` joins it to pg_stat_activity. The "interval"
/// columns are the last closed interval (the newest row `pg_netstat` can show).
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_flows(
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(device, String),
        name!(client_addr, String),
        name!(client_port, i32),
        name!(server_addr, String),
        name!(server_port, i32),
        name!(pid, Option<i32>),
        name!(role, Option<String>),
        name!(database, Option<String>),
        name!(auth, Option<String>),
        name!(packets_in, i64),
        name!(packets_out, i64),
        name!(bytes_in, i64),
        name!(bytes_out, i64),
        name!(interval_start, TimestampWithTimeZone),
        name!(interval_packets_in, i64),
        name!(interval_packets_out, i64),
        name!(interval_bytes_in, i64),
        name!(interval_bytes_out, i64),
        name!(fins_in, i64),
        name!(fins_out, i64),
        name!(resets_in, i64),
        name!(resets_out, i64),
        name!(retransmits_in, i64),
        name!(retransmits_out, i64),
        name!(zero_windows_in, i64),
        name!(zero_windows_out, i64),
        name!(out_of_order_in, i64),
        name!(out_of_order_out, i64),
        name!(state, String),
        name!(first_seen, TimestampWithTimeZone),
        name!(last_seen, TimestampWithTimeZone),
        name!(closed_at, Option<TimestampWithTimeZone>),
    ),
> {
    check_result_columns(fcinfo, "pg_netstat_flows", PG_NETSTAT_FLOWS_COLUMNS);
    let s = Settings::current();
    let last_closed = align(now_us() / 1_000_000 - s.packet_wait_time as i64, s.interval) - s.interval as i64;
    let row = |f: &Flow| {
        let (status, pid, role, db) = (f.status, f.pid, &f.role, &f.database);
        let iv = f.interval(last_closed);
        let t = f.tcp;
        (
            name_str(&f.key.device).to_string(),
            addr_text(&f.key.client_addr, f.key.ipv6),
            f.key.client_port as i32,
            addr_text(&f.key.server_addr, f.key.ipv6),
            f.key.server_port as i32,
            (pid > 0).then_some(pid),
            opt_name(role),
            opt_name(db),
            status.as_str().map(str::to_string),
            as_i64(f.total.packets_in),
            as_i64(f.total.packets_out),
            as_i64(f.total.bytes_in),
            as_i64(f.total.bytes_out),
            timestamptz(last_closed * 1_000_000),
            as_i64(iv.packets_in),
            as_i64(iv.packets_out),
            as_i64(iv.bytes_in),
            as_i64(iv.bytes_out),
            as_i64(t.fin_in),
            as_i64(t.fin_out),
            as_i64(t.rst_in),
            as_i64(t.rst_out),
            as_i64(t.retrans_in),
            as_i64(t.retrans_out),
            as_i64(t.zero_window_in),
            as_i64(t.zero_window_out),
            as_i64(t.ooo_in),
            as_i64(t.ooo_out),
            f.end_state().unwrap_or("open").to_string(),
            timestamptz(f.first_seen_us),
            timestamptz(f.last_seen_us),
            (f.closed_us != 0).then(|| timestamptz(f.closed_us)),
        )
    };
    // Copied a chunk at a time, rows built outside the lock: the worker never waits
    // for the formatting of a large table. Owners are resolved in the table itself as
    // soon as a backend registers, so a connection shows its role from then on.
    let rows: Vec<_> = flowshm::snapshot_flows().iter().map(row).collect();
    TableIterator::new(rows)
}

type TotalsRow = (Option<String>, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, Option<TimestampWithTimeZone>);

fn totals_rows(by_role: bool) -> Vec<TotalsRow> {
    // A copy of a few hundred rows under the shared lock: the totals are kept up to date
    // by the worker, never summed from the flows here.
    let Some((reset, rows)) = flowshm::read(|v| (v.header.stats_reset_us, v.totals(by_role))) else {
        return Vec::new();
    };
    rows.iter()
        .map(|r: &Totals| {
            (
                opt_name(&r.name),
                as_i64(r.connections),
                as_i64(r.counters.packets_in),
                as_i64(r.counters.packets_out),
                as_i64(r.counters.bytes_in),
                as_i64(r.counters.bytes_out),
                as_i64(r.tcp.syn),
                as_i64(r.tcp.rst_in),
                as_i64(r.tcp.rst_out),
                as_i64(r.tcp.retrans_in),
                as_i64(r.tcp.retrans_out),
                as_i64(r.tcp.zero_window_in + r.tcp.zero_window_out),
                (reset != 0).then(|| timestamptz(reset)),
            )
        })
        .collect()
}

const PG_NETSTAT_TOTALS_COLUMNS: &[Column] = &[
    ("name", TEXT),
    ("connections", INT8),
    ("packets_in", INT8),
    ("packets_out", INT8),
    ("bytes_in", INT8),
    ("bytes_out", INT8),
    ("connection_attempts", INT8),
    ("resets_in", INT8),
    ("resets_out", INT8),
    ("retransmits_in", INT8),
    ("retransmits_out", INT8),
    ("zero_windows", INT8),
    ("stats_reset", TSTZ),
];

/// Cumulative traffic per role (`kind` = 'role') or per database ('database') since the
/// last reset: ended connections (folded) and live ones. The row with a NULL name holds
/// connections no backend claimed. Behind the pg_netstat_roles / _databases views.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_totals(
    kind: &str,
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(name, Option<String>),
        name!(connections, i64),
        name!(packets_in, i64),
        name!(packets_out, i64),
        name!(bytes_in, i64),
        name!(bytes_out, i64),
        name!(connection_attempts, i64),
        name!(resets_in, i64),
        name!(resets_out, i64),
        name!(retransmits_in, i64),
        name!(retransmits_out, i64),
        name!(zero_windows, i64),
        name!(stats_reset, Option<TimestampWithTimeZone>),
    ),
> {
    check_result_columns(fcinfo, "pg_netstat_totals", PG_NETSTAT_TOTALS_COLUMNS);
    let by_role = match kind {
        "role" => true,
        "database" => false,
        other => error!("pg_netstat_totals: kind must be 'role' or 'database', not '{other}'"),
    };
    TableIterator::new(totals_rows(by_role))
}

const PG_NETSTAT_FLOW_TABLE_STATUS_COLUMNS: &[Column] = &[
    ("max_flows", INT4),
    ("flows", INT4),
    ("evictions", INT8),
    ("folded", INT8),
    ("owner_overflow", INT8),
    ("stats_reset", TSTZ),
];

/// The flow table itself: size, use, and what it had to give up.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_flow_table_status(
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(max_flows, i32),
        name!(flows, i32),
        name!(evictions, i64),
        name!(folded, i64),
        name!(owner_overflow, i64),
        name!(stats_reset, Option<TimestampWithTimeZone>),
    ),
> {
    check_result_columns(fcinfo, "pg_netstat_flow_table_status", PG_NETSTAT_FLOW_TABLE_STATUS_COLUMNS);
    let row = flowshm::read(|v| {
        let h = v.header;
        (
            h.capacity as i32,
            h.count as i32,
            as_i64(h.evictions),
            as_i64(h.folded),
            as_i64(h.owner_overflow),
            (h.stats_reset_us != 0).then(|| timestamptz(h.stats_reset_us)),
        )
    });
    TableIterator::new(row.into_iter().collect::<Vec<_>>())
}

/// Starts the cumulative figures again from zero: role and database totals, the
/// flow table's eviction counters, and the per-device totals of pg_netstat_devices.
/// Per-connection figures (since each connection began) and the interval history are
/// not touched: they describe windows, not running sums. Like pg_stat_reset(), only
/// superusers may call it unless granted.
#[pg_extern(volatile, parallel_unsafe)]
fn pg_netstat_reset() {
    let now = now_us();
    flowshm::write(|t| t.reset(now));
    let mut shared = STATE.exclusive();
    for d in shared.devices.iter_mut().filter(|d| d.in_use) {
        d.total_base = d.total;
    }
}
