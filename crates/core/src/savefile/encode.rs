//! The file's bytes from a `SavedState`.

use super::*;

struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn text(&mut self, s: &[u8], len: usize) {
        let n = s.len().min(len);
        self.0.extend_from_slice(&s[..n]);
        self.0.resize(self.0.len() + len - n, 0);
    }
    fn counters(&mut self, c: &Counters) {
        for v in [c.packets_in, c.packets_out, c.bytes_in, c.bytes_out] {
            self.u64(v);
        }
    }
    fn tcp(&mut self, t: &TcpCounters) {
        for v in tcp_fields(t) {
            self.u64(v);
        }
    }
    /// Writes a section of `count` records of `record_len` bytes, each by `one`.
    fn section<T>(&mut self, tag: u32, record_len: usize, items: &[T], mut one: impl FnMut(&mut Out, &T)) {
        self.u32(tag);
        self.u32(record_len as u32);
        self.u32(items.len() as u32);
        for it in items {
            let start = self.0.len();
            one(self, it);
            debug_assert_eq!(self.0.len() - start, record_len, "section {tag}: record length");
        }
    }
}

fn tcp_fields(t: &TcpCounters) -> [u64; 11] {
    [
        t.syn,
        t.fin_in,
        t.fin_out,
        t.rst_in,
        t.rst_out,
        t.retrans_in,
        t.retrans_out,
        t.zero_window_in,
        t.zero_window_out,
        t.ooo_in,
        t.ooo_out,
    ]
}

/// The file's bytes.
pub fn encode(s: &SavedState) -> Vec<u8> {
    let mut o = Out(Vec::with_capacity(
        HEADER_LEN
            + 256
            + s.devices.iter().map(|d| d.rows.len()).sum::<usize>() * ROW_LEN
            + (s.roles.len() + s.databases.len()) * TOTALS_LEN
            + s.statements.len() * STATEMENT_LEN,
    ));
    o.0.resize(HEADER_LEN, 0);
    o.section(META, META_LEN, &[s], |o, s| {
        o.i64(s.saved_at_us);
        o.u64(s.system_identifier);
        o.u64(s.in_recovery as u64);
        o.u64(s.at_exit as u64);
        o.text(s.writer.as_bytes(), WRITER_LEN);
        o.u64(s.timeline as u64);
    });
    o.section(DEVICE, DEVICE_LEN, &s.devices, |o, d| {
        o.text(d.name.as_bytes(), DEVICE_NAME_LEN);
        o.counters(&d.total);
        o.counters(&d.total_base);
        o.u64(d.kernel_drops);
        o.u64(d.ring_freezes);
    });
    let rows: Vec<(u32, &Slot)> =
        s.devices.iter().enumerate().flat_map(|(i, d)| d.rows.iter().map(move |r| (i as u32, r))).collect();
    o.section(ROW, ROW_LEN, &rows, |o, (device, r)| {
        o.u32(*device);
        o.u32(r.secs);
        o.i64(r.start);
        o.counters(&r.counters);
        o.u64(r.kernel_drops);
        o.u64(r.late);
        o.i64(r.created_at_us);
        o.tcp(&r.tcp);
    });
    for (tag, rows) in [(ROLE, &s.roles), (DATABASE, &s.databases)] {
        o.section(tag, TOTALS_LEN, rows, |o, (row, t)| {
            o.u32(*row as u32);
            o.u32(t.in_use as u32);
            o.text(&t.name, NAME_LEN);
            o.u64(t.connections);
            o.counters(&t.counters);
            o.tcp(&t.tcp);
        });
    }
    o.section(FLOW_STATS, FLOW_STATS_LEN, &[s.flow_stats], |o, f| {
        o.i64(f.stats_reset_us);
        o.u64(f.evictions);
        o.u64(f.folded);
        o.u64(f.owner_overflow);
    });
    o.section(STATEMENT, STATEMENT_LEN, &s.statements, |o, r| {
        match r.key {
            Some(k) => {
                o.u32(k.kind() as u32);
                o.u32(k.role);
                o.u32(k.database);
                o.u32(0);
                o.u64(k.queryid);
            }
            None => {
                o.u32(OVERFLOW_ROW);
                o.u32(0);
                o.u32(0);
                o.u32(0);
                o.u64(0);
            }
        }
        let f = &r.figures;
        for v in [
            f.calls,
            f.bytes_in,
            f.bytes_out,
            f.segs_in,
            f.segs_out,
            f.retrans,
            f.rtt_sum_us,
            f.rtt_samples,
            f.rtt_max_us,
        ] {
            o.u64(v);
        }
        o.i64(r.first_seen_us);
        o.i64(r.last_seen_us);
    });
    o.section(STATEMENT_TABLE, STATEMENT_TABLE_LEN, &[s.statement_table], |o, t| {
        o.u64(t.evictions);
        o.u64(t.overflow_charges);
        o.i64(t.stats_reset_us);
    });
    o.section(EGRESS, EGRESS_LEN, &s.egress, |o, (row, t)| {
        o.u32(*row as u32);
        o.u32(0);
        o.u64(t.connections);
        o.counters(&t.counters);
        o.tcp(&t.tcp);
    });
    o.section(APPLICATION, APPLICATION_LEN, &s.applications, |o, a| {
        o.text(&a.key.role, NAME_LEN);
        o.text(&a.key.database, NAME_LEN);
        o.text(&a.key.application, NAME_LEN);
        o.u32(a.key.peer_class as u32);
        o.u32(a.key.kind as u32);
        for v in [
            a.connections,
            a.socket.bytes_in,
            a.socket.bytes_out,
            a.socket.segments_in,
            a.socket.segments_out,
            a.socket.retransmits,
        ] {
            o.u64(v);
        }
    });
    o.section(APPLICATION_TABLE, APPLICATION_TABLE_LEN, &[s.application_table], |o, t| {
        o.i64(t.stats_reset_us);
        o.u64(t.app_overflow);
    });
    let body_len = (o.0.len() - HEADER_LEN) as u64;
    let crc = crc32(&o.0[HEADER_LEN..]);
    let mut h = Out(Vec::with_capacity(HEADER_LEN));
    h.0.extend_from_slice(&MAGIC);
    h.u32(FORMAT);
    h.u32(OLDEST_READER);
    h.u64(body_len);
    h.u32(crc);
    h.u32(0);
    o.0[..HEADER_LEN].copy_from_slice(&h.0);
    o.0
}
