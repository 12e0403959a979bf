//! Per statement (pg_netstat_statements), per connection's own socket, per application.

use super::*;

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
        let viewer = Viewer::current();
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                let f = &e.figures;
                // The table-wide overflow row (no key) has no role or database.
                let kind = e.key.map_or(Kind::Other, |k| k.kind());
                let key = e.key.unwrap_or_default();
                let known = e.key.is_some();
                // Another role's query ids only to those who may see its sessions, as
                // pg_stat_statements shows them (its text then comes with them).
                let queryid = kind == Kind::Statement && viewer.sees_role(key.role);
                (
                    kind.as_str().to_string(),
                    known.then_some(key.role as i64),
                    known.then_some(key.database as i64),
                    queryid.then_some(key.queryid as i64),
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
        client_addr: Option<String>,
        client_port: Option<i32>,
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
        let mut viewer = Viewer::current();
        let rows: Vec<_> = slots
            .iter()
            .map(|c| {
                let (role, database, application, class, kind) = app_key_texts(&c.key);
                let full = viewer.sees_role_named(&c.key.role);
                (
                    c.pid,
                    full.then(|| addr_text(&c.client_addr, c.ipv6)),
                    full.then_some(c.client_port as i32),
                    role.unwrap_or_default(),
                    database.unwrap_or_default(),
                    // Shown to all, as pg_stat_activity shows application_name.
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
