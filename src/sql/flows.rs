//! The connection table: flows and their owners (pg_netstat_connections), role and
//! database totals, egress by peer class, the table's own state.

use super::*;
use pg_netstat_core::flows::OwnerStatus;

rows_fn! {
    /// Every TCP connection the worker is tracking, with what the backends told about
    /// themselves. `pg_netstat_connections` joins it to pg_stat_activity. The "interval"
    /// columns are the last closed interval (the newest row `pg_netstat` can show).
    // Long only because it has 32 columns, one per line.
    fn pg_netstat_flows() -> rows(
        device: String,
        client_addr: Option<String>,
        client_port: Option<i32>,
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
        let mut viewer = Viewer::current();
        let mut row = |f: &Flow| {
            let (status, pid, role, db) = (f.status, f.pid, &f.role, &f.database);
            let iv = f.interval(last_closed);
            let t = f.tcp;
            let full = visible(&mut viewer, f);
            // Names a refused or failed login claimed: to the privileged only.
            let names = status == OwnerStatus::Authenticated || viewer.sees_all();
            (
                name_str(&f.key.device).to_string(),
                full.then(|| addr_text(&f.key.client_addr, f.key.ipv6)),
                full.then_some(f.key.client_port as i32),
                addr_text(&f.key.server_addr, f.key.ipv6),
                f.key.server_port as i32,
                (pid > 0).then_some(pid),
                opt_name(role).filter(|_| names),
                opt_name(db).filter(|_| names),
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
        let rows: Vec<_> = flowshm::snapshot_flows().iter().map(&mut row).collect();
        TableIterator::new(rows)
    }
}

/// Whether the caller sees this connection in full (`Viewer`): a session of a role
/// whose privileges it has, or everything.
fn visible(viewer: &mut Viewer, f: &Flow) -> bool {
    viewer.sees_all() || (f.status == OwnerStatus::Authenticated && viewer.sees_role_named(&f.role))
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
        // Rows the caller may not see in full are left out: they would only say what
        // pg_netstat_flows() leaves out for it (the view joins the two on the address).
        let mut viewer = Viewer::current();
        let rows: Vec<_> = flowshm::snapshot_flows()
            .iter()
            .filter(|f| visible(&mut viewer, f))
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

/// Which totals a view reads.
#[derive(Clone, Copy)]
enum TotalsKind {
    Role,
    Database,
    /// Connections that never began a session: one row, under no name.
    Unauthenticated,
}

fn totals_rows(kind: TotalsKind) -> Vec<TotalsRow> {
    // A copy of a few hundred rows under the shared lock: the totals are kept up to date
    // by the worker, never summed from the flows here.
    let Some((reset, rows)) = flowshm::read(|v| {
        let rows = match kind {
            TotalsKind::Role => v.totals(true),
            TotalsKind::Database => v.totals(false),
            TotalsKind::Unauthenticated => vec![v.unauthenticated()],
        };
        (v.header.stats_reset_us, rows)
    }) else {
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
    /// last reset: ended connections (folded) and live ones, of sessions that began. The
    /// row with a NULL name holds connections no backend claimed (and names beyond the
    /// rows kept). With 'unauthenticated': one row, under no name, of the connections
    /// whose login failed or was refused. Behind the pg_netstat_roles / _databases /
    /// _unauthenticated views.
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
        let kind = match kind {
            "role" => TotalsKind::Role,
            "database" => TotalsKind::Database,
            "unauthenticated" => TotalsKind::Unauthenticated,
            other => error!("pg_netstat_totals: kind must be 'role', 'database' or 'unauthenticated', not '{other}'"),
        };
        TableIterator::new(totals_rows(kind))
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
