//! SQL entry points. They only read shared memory; the view and grants are in sql/.

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

rows_fn! {
    /// Every closed interval of every captured device; the `pg_netstat` view orders it.
    fn pg_netstat_history() -> rows(
        device: String,
        ts: TimestampWithTimeZone,
        packets_in: i64,
        packets_out: i64,
        packets_in_speed: i64,
        packets_out_speed: i64,
        bytes_in: i64,
        bytes_out: i64,
        bytes_in_speed: i64,
        bytes_out_speed: i64,
        created_at: TimestampWithTimeZone,
    ) {
        let row = |device: &str, s: &Slot| {
            let secs = s.secs.max(1) as u64;
            let c = s.counters;
            (
                device.to_string(),
                timestamptz(s.start.saturating_mul(1_000_000)),
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
        // Copied under the lock, converted after it: a long history must not keep the
        // collector waiting while PostgreSQL builds the rows.
        let copied: Vec<(String, Slot)> = shmem::share().histories().map(|(d, s)| (d.name().to_string(), *s)).collect();
        let rows: Vec<_> = copied.iter().map(|(d, s)| row(d, s)).collect();
        TableIterator::new(rows)
    }
}

rows_fn! {
    /// Capture status per device: whether it is counting, and if not, why.
    fn pg_netstat_device_status() -> rows(
        device: String,
        capture_method: String,
        state: String,
        state_since: TimestampWithTimeZone,
        packets_in: i64,
        packets_out: i64,
        bytes_in: i64,
        bytes_out: i64,
        kernel_drops: i64,
        ring_freezes: i64,
        last_error: Option<String>,
    ) {
        // A worker that ended with an error had no chance to say so: with no worker
        // running, nothing is capturing whatever its devices last showed.
        let worker_running = WORKER_PID.get().load(Ordering::Acquire) > 0;
        let exited_us = WORKER_EXITED_US.get().load(Ordering::Acquire);
        let rows: Vec<_> = {
            let shared = STATE.share();
            shared
                .devices
                .iter()
                .filter(|d| d.in_use)
                .map(|d| {
                    let err = d.last_error();
                    let (state, since_us) = if worker_running {
                        (d.state, d.state_since_us)
                    } else {
                        (DeviceState::Stopped, if exited_us > 0 { exited_us } else { d.state_since_us })
                    };
                    (
                        d.name().to_string(),
                        CaptureMethod::from_i32(d.method as i32).as_str().to_string(),
                        state.as_str().to_string(),
                        timestamptz(since_us),
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
}

rows_fn! {
    /// Every closed interval with what the compatible view leaves out: its own length (it
    /// changes when pg_netstat.interval is reloaded), packets the kernel dropped, and
    /// packets counted late.
    fn pg_netstat_interval_history() -> rows(
        device: String,
        ts: TimestampWithTimeZone,
        interval_seconds: i32,
        packets_in: i64,
        packets_out: i64,
        bytes_in: i64,
        bytes_out: i64,
        kernel_drops: i64,
        late_packets: i64,
        created_at: TimestampWithTimeZone,
        connection_attempts: i64,
        resets_in: i64,
        resets_out: i64,
        retransmits_in: i64,
        retransmits_out: i64,
        zero_windows_in: i64,
        zero_windows_out: i64,
        out_of_order_in: i64,
        out_of_order_out: i64,
    ) {
        let row = |device: &str, s: &Slot| {
            let t = s.tcp;
            (
                device.to_string(),
                timestamptz(s.start.saturating_mul(1_000_000)),
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
        // Copied under the lock, converted after it: a long history must not keep the
        // collector waiting while PostgreSQL builds the rows.
        let copied: Vec<(String, Slot)> = shmem::share().histories().map(|(d, s)| (d.name().to_string(), *s)).collect();
        let rows: Vec<_> = copied.iter().map(|(d, s)| row(d, s)).collect();
        TableIterator::new(rows)
    }
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

rows_fn! {
    /// Every TCP connection the worker is tracking, with what the backends told about
    /// themselves. `pg_netstat_connections` joins it to pg_stat_activity. The "interval"
    /// columns are the last closed interval (the newest row `pg_netstat` can show).
    // Long only because it has 32 columns, one per line.
    fn pg_netstat_flows() -> rows(
        device: String,
        client_addr: String,
        client_port: i32,
        server_addr: String,
        server_port: i32,
        pid: Option<i32>,
        role: Option<String>,
        database: Option<String>,
        auth: Option<String>,
        packets_in: i64,
        packets_out: i64,
        bytes_in: i64,
        bytes_out: i64,
        interval_start: TimestampWithTimeZone,
        interval_packets_in: i64,
        interval_packets_out: i64,
        interval_bytes_in: i64,
        interval_bytes_out: i64,
        fins_in: i64,
        fins_out: i64,
        resets_in: i64,
        resets_out: i64,
        retransmits_in: i64,
        retransmits_out: i64,
        zero_windows_in: i64,
        zero_windows_out: i64,
        out_of_order_in: i64,
        out_of_order_out: i64,
        state: String,
        first_seen: TimestampWithTimeZone,
        last_seen: TimestampWithTimeZone,
        closed_at: Option<TimestampWithTimeZone>,
    ) {
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
}

rows_fn! {
    /// What pg_netstat_flows() has no room left for (a result has at most 32 columns in
    /// pgrx): each flow's key with the application name and backend type its backend
    /// registered, which stay after the backend is gone. Behind pg_netstat_connections.
    fn pg_netstat_flow_owners() -> rows(
        device: String,
        client_addr: String,
        client_port: i32,
        server_addr: String,
        server_port: i32,
        application: Option<String>,
        backend_type: Option<String>,
        peer_class: String,
    ) {
        let rows: Vec<_> = flowshm::snapshot_flows()
            .iter()
            .map(|f| {
                (
                    name_str(&f.key.device).to_string(),
                    addr_text(&f.key.client_addr, f.key.ipv6),
                    f.key.client_port as i32,
                    addr_text(&f.key.server_addr, f.key.ipv6),
                    f.key.server_port as i32,
                    // An application that gave no name has "" in pg_stat_activity too.
                    (f.kind != BackendKind::Unknown).then(|| name_str(&f.application).to_string()),
                    f.kind.as_str().map(str::to_string),
                    peer::classify(&f.key.client_addr, f.key.ipv6).as_str().to_string(),
                )
            })
            .collect();
        TableIterator::new(rows)
    }
}

rows_fn! {
    /// Captured traffic since the last reset per class of client address (loopback,
    /// private, link-local, public) and backend type (NULL: no backend claimed the
    /// connection), ended connections included. Behind pg_netstat_egress.
    fn pg_netstat_egress_totals() -> rows(
        peer_class: String,
        backend_type: Option<String>,
        connections: i64,
        packets_in: i64,
        packets_out: i64,
        bytes_in: i64,
        bytes_out: i64,
        retransmits_in: i64,
        retransmits_out: i64,
        stats_reset: Option<TimestampWithTimeZone>,
    ) {
        let Some((reset, rows)) = flowshm::read(|v| (v.header.stats_reset_us, v.egress())) else {
            return TableIterator::new(Vec::new());
        };
        let rows: Vec<_> = rows
            .iter()
            .map(|(class, kind, r)| {
                (
                    class.as_str().to_string(),
                    kind.as_str().map(str::to_string),
                    as_i64(r.connections),
                    as_i64(r.counters.packets_in),
                    as_i64(r.counters.packets_out),
                    as_i64(r.counters.bytes_in),
                    as_i64(r.counters.bytes_out),
                    as_i64(r.tcp.retrans_in),
                    as_i64(r.tcp.retrans_out),
                    (reset != 0).then(|| timestamptz(reset)),
                )
            })
            .collect();
        TableIterator::new(rows)
    }
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

rows_fn! {
    /// Cumulative traffic per role (`kind` = 'role') or per database ('database') since the
    /// last reset: ended connections (folded) and live ones. The row with a NULL name holds
    /// connections no backend claimed. Behind the pg_netstat_roles / _databases views.
    fn pg_netstat_totals(kind: &str) -> rows(
        name: Option<String>,
        connections: i64,
        packets_in: i64,
        packets_out: i64,
        bytes_in: i64,
        bytes_out: i64,
        connection_attempts: i64,
        resets_in: i64,
        resets_out: i64,
        retransmits_in: i64,
        retransmits_out: i64,
        zero_windows: i64,
        stats_reset: Option<TimestampWithTimeZone>,
    ) {
        let by_role = match kind {
            "role" => true,
            "database" => false,
            other => error!("pg_netstat_totals: kind must be 'role' or 'database', not '{other}'"),
        };
        TableIterator::new(totals_rows(by_role))
    }
}

rows_fn! {
    /// The flow table itself: size, use, and what it had to give up.
    fn pg_netstat_flow_table_status() -> rows(
        max_flows: i32,
        flows: i32,
        evictions: i64,
        folded: i64,
        owner_overflow: i64,
        stats_reset: Option<TimestampWithTimeZone>,
    ) {
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

rows_fn! {
    /// Network bytes per top-level statement, from each backend's own TCP counters: one
    /// row per (role, database, query id), one "setup" row per role and database (what
    /// connections exchange before their first statement), and "other" rows holding
    /// statements evicted to make room. Behind the pg_netstat_statements view.
    fn pg_netstat_statement_stats() -> rows(
        kind: String,
        userid: Option<i64>,
        dbid: Option<i64>,
        queryid: Option<i64>,
        calls: i64,
        bytes_in: i64,
        bytes_out: i64,
        segments_in: i64,
        segments_out: i64,
        retransmits: i64,
        mean_rtt_ms: Option<f64>,
        max_rtt_ms: Option<f64>,
        first_seen: Option<TimestampWithTimeZone>,
        last_seen: Option<TimestampWithTimeZone>,
        stats_reset: Option<TimestampWithTimeZone>,
    ) {
        // Copied under the shared lock, formatted outside it.
        // The table and the backends' pending charges, copied under the shared lock and
        // added up outside it.
        let Some((mut entries, counters)) = stmtshm::snapshot() else {
            return TableIterator::new(Vec::new());
        };
        let reset = counters.stats_reset_us;
        entries.sort_by_key(|e| std::cmp::Reverse(e.figures.bytes_in + e.figures.bytes_out));
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                let f = &e.figures;
                // The table-wide overflow row (no key) has no role or database.
                let kind = e.key.map_or(Kind::Other, |k| k.kind());
                let key = e.key.unwrap_or_default();
                let known = e.key.is_some();
                (
                    kind.as_str().to_string(),
                    known.then_some(key.role as i64),
                    known.then_some(key.database as i64),
                    (kind == Kind::Statement).then_some(key.queryid as i64),
                    as_i64(f.calls),
                    as_i64(f.bytes_in),
                    as_i64(f.bytes_out),
                    as_i64(f.segs_in),
                    as_i64(f.segs_out),
                    as_i64(f.retrans),
                    (f.rtt_samples > 0).then(|| f.rtt_sum_us as f64 / f.rtt_samples as f64 / 1000.0),
                    (f.rtt_samples > 0).then(|| f.rtt_max_us as f64 / 1000.0),
                    (e.first_seen_us != 0).then(|| timestamptz(e.first_seen_us)),
                    (e.last_seen_us != 0).then(|| timestamptz(e.last_seen_us)),
                    (reset != 0).then(|| timestamptz(reset)),
                )
            })
            .collect();
        TableIterator::new(rows)
    }
}

rows_fn! {
    /// The statement table itself: size, use, and what it had to fold.
    fn pg_netstat_statement_table_status() -> rows(
        max_statements: i32,
        statements: i32,
        evictions: i64,
        overflow_charges: i64,
        stats_reset: Option<TimestampWithTimeZone>,
        connection_slots: i32,
        connections: i32,
        slot_overflow: i64,
        application_rows: i32,
        application_overflow: i64,
    ) {
        let Some(conns) = stmtshm::read_conns(|h, slots, apps| {
            (slots.len() as i32, slots.iter().filter(|c| c.in_use).count() as i32, as_i64(h.slot_overflow),
             apps.len() as i32, as_i64(h.app_overflow))
        }) else {
            return TableIterator::new(Vec::new());
        };
        let row = stmtshm::read(|h, _| {
            (
                h.capacity as i32,
                h.count as i32,
                as_i64(h.evictions),
                as_i64(h.overflow_charges),
                (h.stats_reset_us != 0).then(|| timestamptz(h.stats_reset_us)),
                conns.0,
                conns.1,
                conns.2,
                conns.3,
                conns.4,
            )
        });
        TableIterator::new(row.into_iter().collect::<Vec<_>>())
    }
}

/// A key's texts; the overflow row's are all NULL (it gathers every class and type).
fn app_key_texts(k: &AppKey) -> (Option<String>, Option<String>, Option<String>, Option<String>, Option<String>) {
    let overflow = k.is_overflow();
    let text = |n: &[u8]| (!overflow).then(|| name_str(n).to_string());
    (
        text(&k.role),
        text(&k.database),
        text(&k.application),
        (!overflow).then(|| peer::PeerClass::from_u8(k.peer_class).as_str().to_string()),
        (!overflow).then(|| BackendKind::from_u8(k.kind).as_str().map(str::to_string)).flatten(),
    )
}

rows_fn! {
    /// Each live TCP connection's own socket counters, as its backend last read them
    /// (at its last statement; a walsender at its start): payload bytes and segments
    /// since the connection was accepted. Behind pg_netstat_connections' socket_* columns.
    fn pg_netstat_backend_connections() -> rows(
        pid: i32,
        client_addr: String,
        client_port: i32,
        role: String,
        database: String,
        application: String,
        backend_type: Option<String>,
        peer_class: Option<String>,
        bytes_in: i64,
        bytes_out: i64,
        segments_in: i64,
        segments_out: i64,
        retransmits: i64,
        rtt_ms: f64,
        backend_start: TimestampWithTimeZone,
    ) {
        let slots: Vec<Conn> = stmtshm::copy_conns().map(|(_, slots, _)| slots).unwrap_or_default();
        let rows: Vec<_> = slots
            .iter()
            .map(|c| {
                let (role, database, application, class, kind) = app_key_texts(&c.key);
                (
                    c.pid,
                    addr_text(&c.client_addr, c.ipv6),
                    c.client_port as i32,
                    role.unwrap_or_default(),
                    database.unwrap_or_default(),
                    application.unwrap_or_default(),
                    kind,
                    class,
                    as_i64(c.socket.bytes_in),
                    as_i64(c.socket.bytes_out),
                    as_i64(c.socket.segments_in),
                    as_i64(c.socket.segments_out),
                    as_i64(c.socket.retransmits),
                    c.socket.rtt_us as f64 / 1000.0,
                    timestamptz(c.started_us),
                )
            })
            .collect();
        TableIterator::new(rows)
    }
}

rows_fn! {
    /// Totals since the last reset per role, database, application name (from the
    /// startup packet), peer class and backend type, from the backends' own sockets:
    /// ended connections and live ones (up to their last reading). The row with NULL
    /// names holds connections whose key found every row taken. Behind
    /// pg_netstat_applications and pg_netstat_egress.
    fn pg_netstat_application_totals() -> rows(
        role: Option<String>,
        database: Option<String>,
        application: Option<String>,
        peer_class: Option<String>,
        backend_type: Option<String>,
        connections: i64,
        bytes_in: i64,
        bytes_out: i64,
        segments_in: i64,
        segments_out: i64,
        retransmits: i64,
        stats_reset: Option<TimestampWithTimeZone>,
    ) {
        let Some((h, slots, apps)) = stmtshm::copy_conns() else {
            return TableIterator::new(Vec::new());
        };
        let (reset, rows) = (h.stats_reset_us, conns::totals(&apps, &slots));
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                let (role, database, application, class, kind) = app_key_texts(&r.key);
                (
                    role,
                    database,
                    application,
                    class,
                    kind,
                    as_i64(r.connections),
                    as_i64(r.socket.bytes_in),
                    as_i64(r.socket.bytes_out),
                    as_i64(r.socket.segments_in),
                    as_i64(r.socket.segments_out),
                    as_i64(r.socket.retransmits),
                    (reset != 0).then(|| timestamptz(reset)),
                )
            })
            .collect();
        TableIterator::new(rows)
    }
}
