//! Per-connection accounting, free of PostgreSQL: a bounded table of TCP flows keyed by
//! device and 4-tuple, their TCP health, who owns them (filled in by the backends), and
//! per-role / per-database totals that outlive the flows. The worker owns the table; it
//! lives in shared memory (see `flowshm`) but everything here works on plain slices, so
//! the unit tests drive it with vectors.
//!
//! Every operation is O(1) whatever `max_flows` is — a SYN flood or a port scan costs in
//! proportion to its packets, never to the size of the table:
//! - lookups go through hash indexes (`index`), for flows and for owner records;
//! - a flow gets its owner once, when the flow or the owner record appears (`resolve`);
//! - role and database totals are kept up to date per packet (`totals`), so the views
//!   never walk the flows;
//! - eviction and expiry take the head of a list (`list`): open flows least recently
//!   seen first, closed flows in the order they closed, owners of ended backends oldest
//!   first.
//!
//! Eviction policy, when a new flow finds the table full: a flow already closed (FIN both
//! ways or RST) goes first, the one closed longest ago; otherwise the flow seen least
//! recently. Its figures are already in the role and database totals, so bytes are never
//! lost, only the per-connection detail; `evictions` counts these.

mod flow;
pub mod index;
mod key;
pub mod list;
mod owners;
mod saved;
mod seq;
mod totals;

pub use flow::Flow;
pub use key::{device_bytes, name_bytes, name_str, FlowKey, HashKey, OwnerKey, NAME_LEN};
pub use owners::{Owner, OwnerStatus, ENDED_KEPT_US};
pub use totals::{Totals, TOTALS_ROWS, UNAUTHENTICATED_ROW};

use crate::capture::packet::{TcpFields, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::capture::{Direction, MAX_DEVICES};
use crate::counters::{align, Counters, TcpEvents};
use crate::peer::{self, BackendKind, EGRESS_ROWS};
use flow::tcp_events;
use list::List;

/// Fixed-size bookkeeping at the head of the table. All-zero bytes are an empty table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    /// The indexes' hash secret (`HashKey`), set when the table is created.
    pub hash_key: HashKey,
    pub capacity: u32,
    pub count: u32,
    /// Flows pushed out because the table was full.
    pub evictions: u64,
    /// Flows forgotten (closed, idle, or evicted); their figures stay in the totals.
    pub folded: u64,
    /// Owner records that found the registry full of live backends.
    pub owner_overflow: u64,
    pub stats_reset_us: i64,
    /// Free flow places; places from `never_used` on were never taken.
    free: List,
    never_used: u32,
    /// Open flows, least recently seen first.
    open: List,
    /// Closed flows, in the order they closed.
    closed: List,
    /// Position of the flow the last packet belonged to, plus 1 (0 = none): bulk
    /// transfers send long runs of packets of one flow, which then skip the hash.
    pub last_pos: u32,
    owner_free: List,
    owner_never_used: u32,
    /// Records of ended backends, oldest first.
    ended: List,
    pub owner_count: u32,
    /// The devices being captured, so a backend can find its flows on each.
    devices: [[u8; 16]; MAX_DEVICES],
    device_count: u32,
    /// Totals per peer class and backend kind (`peer::egress_row`), kept packet by packet
    /// like the role and database rows: the egress summary.
    pub egress: [Totals; EGRESS_ROWS],
}

/// The table over its storage. `index` has length `index::len_for(flows.len())`,
/// `owner_index` likewise for `owners`.
pub struct FlowTable<'a> {
    pub header: &'a mut Header,
    pub index: &'a mut [u32],
    pub flows: &'a mut [Flow],
    pub owner_index: &'a mut [u32],
    pub owners: &'a mut [Owner],
    pub roles: &'a mut [Totals],
    pub databases: &'a mut [Totals],
}

/// What readers (the SQL views) may see of the table: nothing they could change.
pub struct FlowView<'a> {
    pub header: &'a Header,
    pub flows: &'a [Flow],
    pub roles: &'a [Totals],
    pub databases: &'a [Totals],
}

impl FlowView<'_> {
    /// The role (or database) totals as the views show them: ended and live connections
    /// alike, since the last reset.
    pub fn totals(&self, by_role: bool) -> Vec<Totals> {
        totals::visible(if by_role { self.roles } else { self.databases })
    }

    /// What connections that never began a session moved (refused, or failed to log in).
    pub fn unauthenticated(&self) -> Totals {
        totals::unauthenticated(self.roles)
    }

    /// The egress rows that hold anything, with their peer class and backend kind.
    pub fn egress(&self) -> Vec<(peer::PeerClass, BackendKind, Totals)> {
        let rows = self.header.egress.iter().enumerate().filter(|(_, r)| !r.is_empty());
        rows.map(|(i, r)| {
            let (c, k) = peer::egress_labels(i);
            (c, k, *r)
        })
        .collect()
    }
}

/// Owned storage, for tests and for sizing.
#[derive(Default)]
pub struct Storage {
    pub header: Header,
    pub index: Vec<u32>,
    pub flows: Vec<Flow>,
    pub owner_index: Vec<u32>,
    pub owners: Vec<Owner>,
    pub roles: Vec<Totals>,
    pub databases: Vec<Totals>,
}

impl Storage {
    pub fn new(capacity: usize, owners: usize) -> Storage {
        Storage {
            header: Header { capacity: capacity as u32, hash_key: HashKey::random(), ..Header::default() },
            index: vec![0; index::len_for(capacity)],
            flows: vec![Flow::default(); capacity],
            owner_index: vec![0; index::len_for(owners)],
            owners: vec![Owner::default(); owners],
            roles: vec![Totals::default(); TOTALS_ROWS],
            databases: vec![Totals::default(); TOTALS_ROWS],
        }
    }

    pub fn table(&mut self) -> FlowTable<'_> {
        FlowTable {
            header: &mut self.header,
            index: &mut self.index,
            flows: &mut self.flows,
            owner_index: &mut self.owner_index,
            owners: &mut self.owners,
            roles: &mut self.roles,
            databases: &mut self.databases,
        }
    }
}

/// Timing the worker passes in with each packet.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Packet timestamp, Unix microseconds.
    pub ts_us: i64,
    pub interval_secs: u32,
}

impl FlowTable<'_> {
    pub fn view(&self) -> FlowView<'_> {
        FlowView { header: self.header, flows: self.flows, roles: self.roles, databases: self.databases }
    }

    /// The devices being captured (the worker sets them at start and on reload).
    pub fn set_devices(&mut self, names: &[String]) {
        self.header.devices = [[0; 16]; MAX_DEVICES];
        for (d, n) in self.header.devices.iter_mut().zip(names) {
            *d = device_bytes(n);
        }
        self.header.device_count = names.len().min(MAX_DEVICES) as u32;
    }

    fn slot(&self, key: &FlowKey) -> (usize, bool) {
        let flows = &*self.flows;
        index::find(self.index, key.hash(&self.header.hash_key), |p| flows[p].key == *key)
    }

    fn flow_pos(&self, key: &FlowKey) -> Option<usize> {
        match self.slot(key) {
            (i, true) => Some(self.index[i] as usize - 1),
            _ => None,
        }
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.flow_pos(key).map(|p| &self.flows[p])
    }

    /// Gives the flow at `pos` its owner, if that backend has registered and the flow
    /// has none yet, and moves what the flow counted so far to the owner's rows.
    fn resolve(&mut self, pos: usize) {
        let f = &self.flows[pos];
        if f.status != OwnerStatus::Unknown {
            return;
        }
        let Some(o) = self.owner(&f.key.owner_key()).copied() else { return };
        if !o.fits(f.first_seen_us, f.opened_here) {
            return;
        }
        let (role_row, db_row) = if o.status == OwnerStatus::Authenticated {
            (totals::row_for(self.roles, &o.role), totals::row_for(self.databases, &o.database))
        } else {
            // Refused or failed: the names are only what the client claimed.
            (totals::UNAUTHENTICATED_ROW, totals::UNAUTHENTICATED_ROW)
        };
        let f = &mut self.flows[pos];
        (f.status, f.pid, f.role, f.database, f.application, f.kind) =
            (o.status, o.pid, o.role, o.database, o.application, o.kind);
        let egress_row = peer::egress_row(peer::classify(&f.key.client_addr, f.key.ipv6), o.kind);
        let c = f.contribution();
        self.roles[f.role_row as usize].remove(&c);
        self.databases[f.db_row as usize].remove(&c);
        self.header.egress[f.egress_row as usize].remove(&c);
        (f.role_row, f.db_row, f.egress_row) = (role_row, db_row, egress_row);
        self.roles[role_row as usize].add(&c);
        self.databases[db_row as usize].add(&c);
        self.header.egress[egress_row as usize].add(&c);
    }

    /// Forgets the flow at `pos` and frees its place. Its figures are already in the
    /// totals; a flow pushed out before its owner was known still gets it here. A
    /// connection that opened under the capture and ended with no backend ever saying
    /// who it was never began a session (a session's backend registers before its first
    /// ReadyForQuery): a startup packet and nothing more, a TLS handshake left hanging, a
    /// scan. Its figures move to the unauthenticated row then; not when it is pushed out
    /// of a full table (`evicted`), when its login may still be under way.
    fn fold(&mut self, pos: usize, evicted: bool) {
        self.resolve(pos);
        let f = &self.flows[pos];
        if !evicted && f.status == OwnerStatus::Unknown && f.opened_here {
            let c = f.contribution();
            let unauth = totals::UNAUTHENTICATED_ROW as usize;
            self.roles[f.role_row as usize].remove(&c);
            self.databases[f.db_row as usize].remove(&c);
            self.roles[unauth].add(&c);
            self.databases[unauth].add(&c);
        }
        if let (i, true) = self.slot(&self.flows[pos].key) {
            let flows = &*self.flows;
            let hk = self.header.hash_key;
            index::remove(self.index, i, |p| flows[p].key.hash(&hk));
        }
        if self.flows[pos].closed_us != 0 {
            self.header.closed.remove(self.flows, pos);
        } else {
            self.header.open.remove(self.flows, pos);
        }
        if self.header.last_pos as usize == pos + 1 {
            self.header.last_pos = 0;
        }
        self.flows[pos] = Flow::default();
        self.header.free.push_back(self.flows, pos);
        self.header.count -= 1;
        self.header.folded += 1;
    }

    /// The flow to push out of a full table (see the module comment).
    fn victim(&self) -> Option<usize> {
        self.header.closed.front().or_else(|| self.header.open.front())
    }

    /// The position of `key`'s flow, and whether it was just created.
    fn find_or_insert(&mut self, key: &FlowKey, now_us: i64) -> (usize, bool) {
        if let Some(p) = (self.header.last_pos as usize).checked_sub(1) {
            if self.flows[p].in_use && self.flows[p].key == *key {
                return (p, false);
            }
        }
        if let Some(p) = self.flow_pos(key) {
            self.header.last_pos = p as u32 + 1;
            return (p, false);
        }
        if self.header.count as usize >= self.flows.len() {
            if let Some(v) = self.victim() {
                self.fold(v, true);
                self.header.evictions += 1;
            }
        }
        let pos = match self.header.free.pop_front(self.flows) {
            Some(p) => p,
            None => {
                self.header.never_used += 1;
                self.header.never_used as usize - 1
            }
        };
        let egress_row = peer::egress_row(peer::classify(&key.client_addr, key.ipv6), BackendKind::Unknown);
        self.flows[pos] = Flow { in_use: true, key: *key, first_seen_us: now_us, egress_row, ..Flow::default() };
        let (i, _) = self.slot(key);
        self.index[i] = pos as u32 + 1;
        self.header.open.push_back(self.flows, pos);
        self.header.count += 1;
        self.header.last_pos = pos as u32 + 1;
        (pos, true)
    }

    /// Counts one packet of the flow `key`; returns the TCP events it carried, for the
    /// device's interval figures. (Inline: the shortcut then runs in the caller's frame,
    /// and only other packets pay for `record_any`'s call.)
    #[inline]
    pub fn record(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        tcp: Option<&TcpFields>,
        wire_len: u32,
        clock: Clock,
    ) -> TcpEvents {
        if let Some(t) = tcp {
            if self.record_in_stream(key, dir, t, wire_len, clock) {
                return TcpEvents::empty();
            }
        }
        self.record_any(key, dir, tcp, wire_len, clock)
    }

    /// The commonest packet, counted with a fraction of `record_any`'s work: the next
    /// segment of the flow the last packet belonged to, open, in the interval it is
    /// counting, with no SYN, FIN or RST, a non-zero window, and either no payload or
    /// payload continuing exactly where that direction's sequence numbers ended. Such a
    /// segment carries no TCP event, and counting it here changes exactly what
    /// `record_any` would (a unit test compares the two on random traffic). Returns
    /// false, having changed nothing, for any other packet.
    #[inline]
    fn record_in_stream(&mut self, key: &FlowKey, dir: Direction, t: &TcpFields, wire_len: u32, clock: Clock) -> bool {
        let Some(pos) = (self.header.last_pos as usize).checked_sub(1) else { return false };
        let Some(f) = self.flows.get_mut(pos) else { return false };
        if !f.in_use || f.key != *key || f.closed_us != 0 {
            return false;
        }
        if t.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || t.window == 0 {
            return false;
        }
        let ts_s = clock.ts_us.div_euclid(1_000_000);
        if ts_s < f.cur_start || ts_s >= f.cur_start + clock.interval_secs.max(1) as i64 {
            return false;
        }
        let payload = t.payload_len(wire_len);
        let d = match dir {
            Direction::In => 0,
            Direction::Out => 1,
        };
        if payload > 0 && !f.seq[d].extend_in_order(t.seq, t.seq.wrapping_add(payload)) {
            return false;
        }
        f.total.add(dir, wire_len as u64);
        f.cur.add(dir, wire_len as u64);
        f.last_seen_us = f.last_seen_us.max(clock.ts_us);
        let (rr, dr, er) = (f.role_row as usize, f.db_row as usize, f.egress_row as usize);
        self.roles[rr].counters.add(dir, wire_len as u64);
        self.databases[dr].counters.add(dir, wire_len as u64);
        self.header.egress[er].counters.add(dir, wire_len as u64);
        // The last packet's flow is already the open list's last by construction; the
        // check is cheap and keeps the list right should that ever change.
        if self.header.open.back() != Some(pos) {
            self.header.open.remove(self.flows, pos);
            self.header.open.push_back(self.flows, pos);
        }
        true
    }

    /// `record` for any packet.
    #[inline(never)]
    fn record_any(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        tcp: Option<&TcpFields>,
        wire_len: u32,
        clock: Clock,
    ) -> TcpEvents {
        let new_connection = tcp.is_some_and(|t| t.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN);
        if new_connection {
            // The same 4-tuple again after a close (a client port reused): a new
            // connection, not more of the old one.
            if let Some(pos) = self.flow_pos(key) {
                if self.flows[pos].closed_us != 0 {
                    self.fold(pos, false);
                }
            }
        }
        let (pos, inserted) = self.find_or_insert(key, clock.ts_us);
        if inserted {
            self.flows[pos].opened_here = new_connection;
        }
        let f = &mut self.flows[pos];
        let was_open = f.closed_us == 0;
        f.total.add(dir, wire_len as u64);
        f.last_seen_us = f.last_seen_us.max(clock.ts_us);
        let secs = clock.interval_secs.max(1) as i64;
        let ts_s = clock.ts_us.div_euclid(1_000_000);
        let start =
            if ts_s >= f.cur_start && ts_s < f.cur_start + secs { f.cur_start } else { align(ts_s, secs as u32) };
        if start > f.cur_start {
            (f.prev_start, f.prev) = (f.cur_start, f.cur);
            (f.cur_start, f.cur) = (start, Counters::default());
        }
        if start == f.cur_start {
            f.cur.add(dir, wire_len as u64);
        } else if start == f.prev_start {
            f.prev.add(dir, wire_len as u64);
        }
        let ev = match tcp {
            Some(t) => tcp_events(f, dir, t, wire_len, clock.ts_us),
            None => TcpEvents::empty(),
        };
        // The role and database rows follow packet by packet.
        let first_syn = ev.contains(TcpEvents::SYN) && f.tcp.syn == f.base_tcp.syn;
        f.tcp.add_events(ev);
        let (rr, dr, er, closed) = (f.role_row as usize, f.db_row as usize, f.egress_row as usize, f.closed_us != 0);
        for row in [&mut self.roles[rr], &mut self.databases[dr], &mut self.header.egress[er]] {
            row.counters.add(dir, wire_len as u64);
            if !ev.is_empty() {
                row.tcp.add_events(ev);
                row.connections += first_syn as u64;
            }
        }
        if was_open && closed {
            self.header.open.remove(self.flows, pos);
            self.header.closed.push_back(self.flows, pos);
        } else if was_open && self.header.open.back() != Some(pos) {
            self.header.open.remove(self.flows, pos);
            self.header.open.push_back(self.flows, pos);
        }
        if inserted {
            self.resolve(pos);
        }
        ev
    }

    /// Folds flows closed more than `linger_us` ago or idle longer than `idle_us`
    /// (0 = never), and forgets owner records of backends long gone: at most `budget`
    /// of them, oldest first, so one call holds the lock for bounded work. Returns
    /// true when more are due.
    pub fn sweep(&mut self, now_us: i64, linger_us: i64, idle_us: i64, budget: usize) -> bool {
        let mut n = 0;
        while n < budget {
            match self.header.closed.front() {
                Some(p) if now_us - self.flows[p].closed_us > linger_us => self.fold(p, false),
                _ => break,
            }
            n += 1;
        }
        while idle_us > 0 && n < budget {
            match self.header.open.front() {
                Some(p) if now_us - self.flows[p].last_seen_us > idle_us => self.fold(p, false),
                _ => break,
            }
            n += 1;
        }
        n += self.expire_owners(now_us, budget - n);
        n >= budget
    }

    /// pg_netstat_reset(): role and database totals start again from zero; the flows
    /// keep their own figures but count towards the totals only from here. (Walks the
    /// table once: called by a user, never on the capture path.)
    pub fn reset(&mut self, now_us: i64) {
        for r in self.roles.iter_mut().chain(self.databases.iter_mut()).chain(self.header.egress.iter_mut()) {
            r.clear();
        }
        for f in self.flows.iter_mut().filter(|f| f.in_use) {
            f.base = f.total;
            f.base_tcp = f.tcp;
        }
        self.header.evictions = 0;
        self.header.folded = 0;
        self.header.owner_overflow = 0;
        self.header.stats_reset_us = now_us;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::TcpCounters;

    impl FlowTable<'_> {
        /// `record`, with the segment's events as counters (easier to assert on).
        fn rec(
            &mut self,
            key: &FlowKey,
            dir: Direction,
            tcp: Option<&TcpFields>,
            len: u32,
            clock: Clock,
        ) -> TcpCounters {
            self.record(key, dir, tcp, len, clock).into()
        }
    }

    const SERVER: [u8; 16] = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    fn key(port: u16) -> FlowKey {
        let mut k = FlowKey { client_port: port, server_port: 5432, ..FlowKey::default() };
        k.client_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        k.server_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        k
    }

    fn tcp(seq: u32, flags: u8, payload: u32) -> TcpFields {
        TcpFields { seq, flags, window: 512, header_len: 20, offset: 34, segment_len: Some(20 + payload) }
    }

    fn at(s: i64) -> Clock {
        Clock { ts_us: s * 1_000_000, interval_secs: 10 }
    }

    fn owner(port: u16, pid: i32, role: &str, db: &str) -> Owner {
        let k = key(port);
        Owner {
            in_use: true,
            key: OwnerKey { client_addr: k.client_addr, client_port: port, server_port: 5432, ipv6: false },
            status: OwnerStatus::Authenticated,
            pid,
            role: name_bytes(role.as_bytes()),
            database: name_bytes(db.as_bytes()),
            started_us: 1_500_000,
            ended_us: 0,
            ..Owner::default()
        }
    }

    #[test]
    fn the_in_stream_shortcut_changes_exactly_what_the_general_path_changes() {
        // The same random traffic through `record` (with the shortcut) and `record_any`
        // (without): three connections in a table of two (evictions), mostly in-order
        // data and bare ACKs, with SYNs, FINs, RSTs, zero windows, repeats, gaps,
        // interval edges, an owner appearing, and sweeps. Everything must stay equal.
        let (mut a, mut b) = (Storage::new(2, 4), Storage::new(2, 4));
        b.header.hash_key = a.header.hash_key; // the same secret: the same index layout
        let mut next = crate::capture::testframes::xorshift(0xfa57);
        let mut seq = [[1000u32; 2]; 3];
        let mut ts_us = 1_000_000_000i64;
        let mut shortcut_taken = 0;
        for step in 0..30_000u32 {
            let r = next() as u64 | (next() as u64) << 32;
            let port = 40100 + if r.is_multiple_of(16) { (r >> 8) % 3 } else { step as u64 / 700 % 3 } as u16;
            let c = (port - 40100) as usize;
            let dir = if (r >> 12).is_multiple_of(3) { Direction::Out } else { Direction::In };
            let d = dir as usize;
            let flags = match (r >> 16) % 64 {
                0 => TCP_SYN,
                1 => TCP_SYN | TCP_ACK,
                2 => TCP_FIN | TCP_ACK,
                3 => TCP_RST,
                _ => TCP_ACK,
            };
            let payload = [0, 0, 10, 1448][(r >> 24) as usize % 4];
            let s0 = match (r >> 28) % 32 {
                0 => seq[c][d].wrapping_sub(payload.max(1)), // a repeat
                1 => seq[c][d].wrapping_add(500),            // a gap
                _ => seq[c][d],
            };
            seq[c][d] = s0.wrapping_add(payload + (flags & (TCP_SYN | TCP_FIN) != 0) as u32);
            let mut t = tcp(s0, flags, payload);
            if (r >> 34).is_multiple_of(50) {
                t.window = 0;
            }
            ts_us += [7, 900, 250_000][(r >> 40) as usize % 3];
            let clock = Clock { ts_us, interval_secs: 1 + step / 15_000 };
            let (k, len) = (key(port), 54 + payload);
            // What `record` does, step by step, to count how often the shortcut is taken.
            let took = a.table().record_in_stream(&k, dir, &t, len, clock);
            let ev_a = if took { TcpEvents::empty() } else { a.table().record_any(&k, dir, Some(&t), len, clock) };
            let ev_b = b.table().record_any(&k, dir, Some(&t), len, clock);
            assert_eq!(ev_a, ev_b, "step {step}");
            shortcut_taken += took as u32;
            if step == 10_000 {
                for s in [&mut a, &mut b] {
                    s.table().register_owner(owner(40101, 7, "carol", "shop"), SERVER);
                }
            }
            if step % 5_000 == 4_999 {
                for s in [&mut a, &mut b] {
                    s.table().sweep(ts_us, 1_000_000, 2_000_000, 16);
                }
            }
            // (Every state compared would take minutes in a debug build.)
            if step.is_multiple_of(16) || step == 29_999 {
                let show =
                    |s: &Storage| format!("{:?} {:?} {:?} {:?} {:?}", s.header, s.index, s.flows, s.roles, s.databases);
                assert_eq!(show(&a), show(&b), "step {step}");
            }
        }
        assert!(shortcut_taken > 10_000, "the shortcut was taken only {shortcut_taken} times");
    }

    #[test]
    fn a_connection_from_syn_to_fin() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        let k = key(40000);
        let ack = TCP_ACK;
        let ev = t.rec(&k, Direction::In, Some(&tcp(100, TCP_SYN, 0)), 74, at(1000));
        assert_eq!(ev.syn, 1);
        t.rec(&k, Direction::Out, Some(&tcp(900, TCP_SYN | ack, 0)), 74, at(1000));
        t.rec(&k, Direction::In, Some(&tcp(101, ack, 50)), 104, at(1001));
        t.rec(&k, Direction::Out, Some(&tcp(901, ack, 1000)), 1054, at(1001));
        t.rec(&k, Direction::In, Some(&tcp(151, TCP_FIN | ack, 0)), 54, at(1002));
        t.rec(&k, Direction::Out, Some(&tcp(1901, TCP_FIN | ack, 0)), 54, at(1002));
        let f = *t.get(&k).unwrap();
        assert_eq!((f.total.packets_in, f.total.packets_out, f.total.bytes_in, f.total.bytes_out), (3, 3, 232, 1182));
        assert_eq!((f.tcp.syn, f.tcp.fin_in, f.tcp.fin_out, f.tcp.retrans_in, f.tcp.retrans_out), (1, 1, 1, 0, 0));
        assert_eq!(f.closed_us, 1_002_000_000);
        assert_eq!(f.end_state(), Some("closed by client"));
        assert_eq!(f.interval(1000).packets(), 6);
    }

    #[test]
    fn retransmissions_partial_and_whole_but_not_keepalives() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        let k = key(40001);
        t.rec(&k, Direction::Out, Some(&tcp(1000, TCP_ACK, 100)), 154, at(1));
        assert_eq!(t.rec(&k, Direction::Out, Some(&tcp(1000, TCP_ACK, 100)), 154, at(1)).retrans_out, 1);
        assert_eq!(t.rec(&k, Direction::Out, Some(&tcp(1050, TCP_ACK, 100)), 154, at(1)).retrans_out, 1);
        assert_eq!(t.rec(&k, Direction::Out, Some(&tcp(1150, TCP_ACK, 100)), 154, at(1)).retrans_out, 0);
        // A keep-alive probe: one below the next sequence number, no data.
        assert_eq!(t.rec(&k, Direction::Out, Some(&tcp(1249, TCP_ACK, 0)), 54, at(1)).retrans_out, 0);
        // Pure ACKs the other way never count.
        assert_eq!(t.rec(&k, Direction::In, Some(&tcp(7, TCP_ACK, 0)), 54, at(1)).retrans_in, 0);
        assert_eq!(t.rec(&k, Direction::In, Some(&tcp(7, TCP_ACK, 0)), 54, at(1)).retrans_in, 0);
        // Across the 2^32 wrap.
        let k2 = key(40002);
        t.rec(&k2, Direction::In, Some(&tcp(u32::MAX - 10, TCP_ACK, 100)), 154, at(1));
        assert_eq!(t.rec(&k2, Direction::In, Some(&tcp(89, TCP_ACK, 100)), 154, at(1)).retrans_in, 0);
        assert_eq!(t.rec(&k2, Direction::In, Some(&tcp(u32::MAX - 10, TCP_ACK, 100)), 154, at(1)).retrans_in, 1);
    }

    #[test]
    fn reordering_is_out_of_order_not_retransmission() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        let k = key(40004);
        let seg = |t: &mut FlowTable<'_>, seq| t.rec(&k, Direction::In, Some(&tcp(seq, TCP_ACK, 100)), 154, at(1));
        seg(&mut t, 1000);
        // 1100 is late: 1200 and 1300 arrive first, leaving a gap.
        assert_eq!(seg(&mut t, 1200), TcpCounters::default());
        seg(&mut t, 1300);
        let ev = seg(&mut t, 1100);
        assert_eq!((ev.retrans_in, ev.ooo_in), (0, 1));
        // Now 1100 has been seen: sending it again is a retransmission.
        let ev = seg(&mut t, 1100);
        assert_eq!((ev.retrans_in, ev.ooo_in), (1, 0));
        // A segment in the middle of a gap splits it; both halves can still be filled.
        seg(&mut t, 2000); // gap [1400, 2000)
        assert_eq!(seg(&mut t, 1600).ooo_in, 1);
        assert_eq!(seg(&mut t, 1400).ooo_in, 1);
        assert_eq!(seg(&mut t, 1800).ooo_in, 1);
        let ev = seg(&mut t, 1800); // [1800, 1900) already seen
        assert_eq!((ev.retrans_in, ev.ooo_in), (1, 0));
        let ev = seg(&mut t, 1500);
        assert_eq!((ev.retrans_in, ev.ooo_in), (0, 1));
        assert_eq!(t.get(&k).unwrap().tcp.retrans_in, 2);
    }

    #[test]
    fn zero_windows_and_resets() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        let k = key(40003);
        let mut z = tcp(5, TCP_ACK, 0);
        z.window = 0;
        assert_eq!(t.rec(&k, Direction::In, Some(&z), 54, at(1)).zero_window_in, 1);
        // A zero window after the sender's own FIN is the socket closing, not a full
        // receive buffer.
        let k2 = key(40005);
        let mut fin = tcp(9, TCP_FIN | TCP_ACK, 0);
        t.rec(&k2, Direction::Out, Some(&fin), 54, at(1));
        fin.flags = TCP_ACK;
        fin.window = 0;
        assert_eq!(t.rec(&k2, Direction::Out, Some(&fin), 54, at(1)).zero_window_out, 0);
        // A RST commonly carries window 0: that is not a full receive buffer.
        z.flags = TCP_RST;
        let ev = t.rec(&k, Direction::In, Some(&z), 54, at(2));
        assert_eq!((ev.rst_in, ev.zero_window_in), (1, 0));
        assert_eq!(t.get(&k).unwrap().end_state(), Some("reset by client"));
        assert_eq!(t.get(&k).unwrap().closed_us, 2_000_000);
    }

    #[test]
    fn padding_is_not_payload_and_big_tcp_uses_the_wire_length() {
        // A 54-byte ACK padded to 60 bytes on Ethernet.
        let t = TcpFields { seq: 0, flags: TCP_ACK, window: 1, header_len: 20, offset: 34, segment_len: Some(20) };
        assert_eq!(t.payload_len(60), 0);
        let big = TcpFields { segment_len: None, ..t };
        assert_eq!(big.payload_len(34 + 20 + 150_000), 150_000);
    }

    #[test]
    fn owners_resolve_and_totals_survive_the_flow() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        let (a, b) = (key(40010), key(40011));
        t.rec(&a, Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        t.rec(&b, Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        t.set_devices(&[String::new()]);
        t.register_owner(owner(40010, 111, "alice", "sales"), SERVER);
        assert_eq!(name_str(&t.get(&a).unwrap().role), "alice");
        assert_eq!(t.get(&b).unwrap().status, OwnerStatus::Unknown);
        t.rec(&a, Direction::Out, Some(&tcp(1, TCP_ACK, 500)), 554, at(2));
        t.rec(&a, Direction::In, Some(&tcp(2, TCP_RST, 0)), 54, at(3));
        t.end_owner(&owner(40010, 111, "", "").key, 111, 3_000_000);
        // Live: the role's totals already include the flow.
        let roles = t.view().totals(true);
        let alice = roles.iter().find(|r| name_str(&r.name) == "alice").unwrap();
        assert_eq!((alice.connections, alice.counters.bytes_out, alice.tcp.rst_in), (1, 554, 1));
        // Folded after the linger: same figures, flow gone.
        assert!(!t.sweep(10_000_000, 5_000_000, 0, 100));
        assert!(t.get(&a).is_none());
        assert_eq!(t.header.count, 1);
        let roles = t.view().totals(true);
        let alice = roles.iter().find(|r| name_str(&r.name) == "alice").unwrap();
        assert_eq!((alice.connections, alice.counters.bytes_out, alice.counters.packets()), (1, 554, 3));
        let unknown = roles.iter().find(|r| r.name[0] == 0).unwrap();
        assert_eq!((unknown.connections, unknown.counters.packets_in), (1, 1));
        let dbs = t.view().totals(false);
        assert_eq!(dbs.iter().find(|r| name_str(&r.name) == "sales").unwrap().counters.bytes_in, 128);
        // Owner records of ended backends are forgotten a minute later.
        t.sweep(64_000_001, 5_000_000, 0, 100);
        assert!(t.owners.iter().all(|o| !o.in_use));
    }

    #[test]
    fn names_claimed_by_failed_logins_take_no_row_and_their_traffic_is_counted_apart() {
        // More failed logins under invented names than there are rows, then two sessions.
        let mut s = Storage::new(1024, 1024);
        let mut t = s.table();
        t.set_devices(&[String::new()]);
        let failed = TOTALS_ROWS as u16 + 50;
        for i in 0..failed {
            let port = 41000 + i;
            t.rec(&key(port), Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
            t.rec(&key(port), Direction::In, Some(&tcp(2, TCP_ACK, 40)), 94, at(1));
            let status = if i % 2 == 0 { OwnerStatus::AuthFailed } else { OwnerStatus::Rejected };
            let o = Owner { status, ..owner(port, 1000 + i as i32, &format!("fake_{i}"), &format!("fakedb_{i}")) };
            t.register_owner(o, SERVER);
        }
        for (port, role, db) in [(42000, "alice", "sales"), (42001, "bob", "reports")] {
            t.rec(&key(port), Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(2));
            t.register_owner(Owner { started_us: 2_500_000, ..owner(port, 7, role, db) }, SERVER);
            t.rec(&key(port), Direction::Out, Some(&tcp(1, TCP_ACK, 2000)), 2054, at(2));
        }
        for by_role in [true, false] {
            let names: Vec<String> = t.view().totals(by_role).iter().map(|r| name_str(&r.name).to_string()).collect();
            let want = if by_role { ["alice", "bob"] } else { ["sales", "reports"] };
            assert_eq!(names, want, "no invented name, no NULL row: every connection had an owner");
        }
        let alice = t.view().totals(true)[0];
        assert_eq!((alice.connections, alice.counters.bytes_out, alice.counters.bytes_in), (1, 2054, 74));
        let u = t.view().unauthenticated();
        assert_eq!(
            (u.connections, u.counters.packets_in, u.counters.bytes_in),
            (failed as u64, 2 * failed as u64, 168 * failed as u64)
        );
        assert_eq!(u.name[0], 0);
        // The failed connections themselves still show the names they claimed.
        assert_eq!(name_str(&t.get(&key(41001)).unwrap().role), "fake_1");
    }

    #[test]
    fn reset_restarts_totals_but_not_connections() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        let a = key(40020);
        t.rec(&a, Direction::In, Some(&tcp(1, TCP_ACK, 10)), 64, at(1));
        t.reset(2_000_000);
        t.rec(&a, Direction::In, Some(&tcp(11, TCP_ACK, 10)), 64, at(3));
        assert_eq!(t.get(&a).unwrap().total.packets_in, 2);
        let unknown = t.view().totals(true)[0];
        assert_eq!((unknown.counters.packets_in, unknown.connections), (1, 0));
    }

    #[test]
    fn full_table_evicts_closed_then_least_recent_and_keeps_every_byte() {
        let mut s = Storage::new(4, 4);
        let mut t = s.table();
        for p in 0..4 {
            t.rec(&key(41000 + p), Direction::In, Some(&tcp(1, TCP_ACK, 10)), 100, at(10 + p as i64));
        }
        t.rec(&key(41002), Direction::In, Some(&tcp(11, TCP_RST, 0)), 54, at(20));
        t.rec(&key(42000), Direction::In, None, 100, at(21));
        assert!(t.get(&key(41002)).is_none(), "the closed flow goes first");
        t.rec(&key(42001), Direction::In, None, 100, at(22));
        assert!(t.get(&key(41000)).is_none(), "then the least recently seen");
        assert_eq!((t.header.count, t.header.evictions), (4, 2));
        for p in [41001, 41003, 42000, 42001] {
            assert!(t.get(&key(p)).is_some(), "{p}");
        }
        let all: u64 = t.view().totals(true).iter().map(|r| r.counters.bytes_in).sum();
        assert_eq!(all, 4 * 100 + 54 + 2 * 100);
    }

    #[test]
    fn the_index_survives_random_inserts_and_removals() {
        // Backward-shift deletion must keep every remaining key findable.
        let mut s = Storage::new(64, 64);
        let mut t = s.table();
        let mut rng = crate::capture::testframes::xorshift(7);
        let mut live = std::collections::BTreeSet::new();
        for step in 0..5000 {
            let p = 30000 + (rng() % 200) as u16;
            if rng().is_multiple_of(3) {
                if let Some(pos) = t.flow_pos(&key(p)) {
                    t.fold(pos, false);
                    live.remove(&p);
                }
            } else {
                t.rec(&key(p), Direction::In, None, 60, at(step));
                live.insert(p);
                if live.len() > 64 {
                    // The table evicted one: forget whichever it was.
                    live.retain(|q| t.get(&key(*q)).is_some());
                }
            }
            assert_eq!(t.header.count as usize, live.len());
            for q in &live {
                assert!(t.get(&key(*q)).is_some(), "step {step}: {q} lost");
            }
        }
    }

    #[test]
    fn an_owner_registered_before_its_flow_is_captured_is_found_when_the_flow_appears() {
        // The backend authenticates before the worker has read the SYN from the ring.
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        t.register_owner(owner(40030, 7, "carol", "shop"), SERVER);
        t.rec(&key(40030), Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        let f = t.get(&key(40030)).unwrap();
        assert_eq!((name_str(&f.role), f.pid), ("carol", 7));
        let carol = t.view().totals(true).into_iter().find(|r| name_str(&r.name) == "carol").unwrap();
        assert_eq!((carol.connections, carol.counters.bytes_in), (1, 74));
    }

    #[test]
    fn egress_rows_follow_the_peer_class_and_the_owners_backend_kind() {
        use crate::peer::{BackendKind, PeerClass};
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        t.set_devices(&[String::new()]);
        // 10.0.0.2 (private): unknown until its walsender registers, then moved whole.
        t.rec(&key(40040), Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        t.rec(&key(40040), Direction::Out, None, 1000, at(1));
        assert_eq!(
            t.view().egress().iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
            vec![(PeerClass::Private, BackendKind::Unknown)]
        );
        let mut o = owner(40040, 9, "replicator", "");
        o.kind = BackendKind::WalSender;
        o.application = name_bytes(b"standby1");
        t.register_owner(o, SERVER);
        t.rec(&key(40040), Direction::Out, None, 500, at(2));
        // A public client (8.8.4.4) whose client backend registered first.
        let mut public = key(40041);
        public.client_addr[..4].copy_from_slice(&[8, 8, 4, 4]);
        let mut o = owner(40041, 10, "app", "shop");
        o.key.client_addr = public.client_addr;
        o.kind = BackendKind::Client;
        t.rec(&public, Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        t.register_owner(o, SERVER);
        t.rec(&public, Direction::Out, None, 3000, at(2));
        let egress = t.view().egress();
        let got: Vec<_> = egress.iter().map(|(c, k, r)| (*c, *k, r.connections, r.counters.bytes_out)).collect();
        assert_eq!(
            got,
            vec![
                (PeerClass::Private, BackendKind::WalSender, 1, 1500),
                (PeerClass::Public, BackendKind::Client, 1, 3000)
            ]
        );
        assert_eq!(name_str(&t.get(&key(40040)).unwrap().application), "standby1");
        // The egress rows always add up to the role rows.
        let sum = |rows: Vec<Totals>| rows.iter().map(|r| r.counters.bytes_in + r.counters.bytes_out).sum::<u64>();
        assert_eq!(sum(egress.into_iter().map(|e| e.2).collect()), sum(t.view().totals(true)));
        t.reset(5);
        assert!(t.view().egress().is_empty());
        t.rec(&public, Direction::Out, None, 40, at(3));
        assert_eq!(t.view().egress()[0].2.counters.bytes_out, 40);
    }

    #[test]
    fn an_owner_registered_after_its_flow_takes_the_flow_on_every_device() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        t.set_devices(&["eth0".to_string(), "lo".to_string()]);
        let on = |dev: &str| FlowKey { device: device_bytes(dev), ..key(40031) };
        t.rec(&on("eth0"), Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        t.rec(&on("lo"), Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        assert_eq!(t.view().totals(true)[0].counters.bytes_in, 148, "unknown until the backend registers");
        t.register_owner(owner(40031, 8, "dave", "shop"), SERVER);
        for dev in ["eth0", "lo"] {
            assert_eq!(name_str(&t.get(&on(dev)).unwrap().role), "dave", "{dev}");
        }
        let roles = t.view().totals(true);
        assert!(roles.iter().all(|r| r.name[0] != 0), "nothing left unknown: {roles:?}");
        assert_eq!((roles[0].connections, roles[0].counters.bytes_in), (2, 148));
    }

    #[test]
    fn a_reused_client_port_is_not_given_the_earlier_backend() {
        let mut s = Storage::new(8, 8);
        let mut t = s.table();
        t.set_devices(&[String::new()]);
        let k = key(40032);
        t.rec(&k, Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        t.register_owner(owner(40032, 9, "erin", "shop"), SERVER);
        t.rec(&k, Direction::In, Some(&tcp(2, TCP_FIN | TCP_ACK, 0)), 54, at(2));
        t.rec(&k, Direction::Out, Some(&tcp(9, TCP_FIN | TCP_ACK, 0)), 54, at(2));
        t.end_owner(&owner(40032, 9, "", "").key, 9, 2_500_000);
        // The same port, a new connection, before its backend registers.
        t.rec(&k, Direction::In, Some(&tcp(500, TCP_SYN, 0)), 74, at(3));
        assert_eq!(t.get(&k).unwrap().status, OwnerStatus::Unknown, "erin's record is older than this SYN");
        let mut frank = owner(40032, 10, "frank", "shop");
        frank.started_us = 3_200_000;
        t.register_owner(frank, SERVER);
        assert_eq!(name_str(&t.get(&k).unwrap().role), "frank");
        let roles = t.view().totals(true);
        let erin = roles.iter().find(|r| name_str(&r.name) == "erin").unwrap();
        assert_eq!((erin.connections, erin.counters.packets()), (1, 3));
    }

    #[test]
    fn a_full_owner_registry_reuses_the_oldest_ended_record_and_counts_what_it_loses() {
        let mut s = Storage::new(4, 3);
        let mut t = s.table();
        for (port, pid) in [(1, 1), (2, 2), (3, 3)] {
            t.register_owner(owner(port, pid, "r", "d"), SERVER);
        }
        t.end_owner(&owner(2, 0, "", "").key, 2, 5);
        t.end_owner(&owner(1, 0, "", "").key, 1, 6);
        t.register_owner(owner(4, 4, "r", "d"), SERVER);
        assert!(t.owner(&owner(2, 0, "", "").key).is_none(), "the one ended first made room");
        assert!(t.owner(&owner(1, 0, "", "").key).is_some());
        t.register_owner(owner(5, 5, "r", "d"), SERVER);
        assert!(t.owner(&owner(1, 0, "", "").key).is_none());
        t.register_owner(owner(6, 6, "r", "d"), SERVER);
        assert_eq!((t.header.owner_overflow, t.header.owner_count), (1, 3), "all live: the record is lost, counted");
        for p in [3, 4, 5] {
            assert!(t.owner(&owner(p, 0, "", "").key).is_some(), "{p}");
        }
    }

    #[test]
    fn sweeping_takes_only_what_is_due_within_its_budget() {
        let mut s = Storage::new(16, 16);
        let mut t = s.table();
        for p in 0..10 {
            let k = key(43000 + p);
            t.rec(&k, Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(p as i64 + 1));
            t.rec(&k, Direction::Out, Some(&tcp(1, TCP_RST, 0)), 54, at(p as i64 + 1));
        }
        t.rec(&key(43100), Direction::In, None, 60, at(1)); // open, idle from 1 s
                                                            // At 12 s with a 5 s linger, flows closed at 1..=6 s are due: 6 of them.
        assert!(t.sweep(12_000_000, 5_000_000, 0, 4), "4 of 6 done, more due");
        assert!(!t.sweep(12_000_000, 5_000_000, 0, 4));
        assert_eq!(t.header.count, 5);
        assert!(t.get(&key(43005)).is_none() && t.get(&key(43006)).is_some());
        // Idle flows go too once their time is up.
        assert!(!t.sweep(12_000_000, 5_000_000, 10_000_000, 100));
        assert!(t.get(&key(43100)).is_none());
        // The flows closed after their SYN with no backend ever claiming them never began
        // a session: unauthenticated; the others (no SYN seen) stay unknown.
        let (unknown, unauth) = (t.view().totals(true)[0], t.view().unauthenticated());
        assert_eq!((unknown.connections, unknown.counters.packets()), (4, 9), "folded flows stay in the totals");
        assert_eq!((unauth.connections, unauth.counters.packets()), (6, 12));
    }

    #[test]
    fn totals_always_equal_what_the_flows_carried() {
        // Random packets, owners, closes, evictions and sweeps: the role rows must always
        // equal the sum over every flow ever seen of what it carried (bytes and
        // connections), attributed to the role of its owner when known.
        let mut s = Storage::new(32, 16);
        let mut t = s.table();
        t.set_devices(&[String::new()]);
        let mut rng = crate::capture::testframes::xorshift(99);
        let (mut bytes, mut syns) = (0u64, 0u64);
        for step in 0..20_000i64 {
            let port = 44000 + (rng() % 48) as u16;
            let k = key(port);
            let ts = at(step / 100);
            match rng() % 10 {
                0 => {
                    t.rec(&k, Direction::In, Some(&tcp(rng(), TCP_SYN, 0)), 74, ts);
                    bytes += 74;
                    syns += 1;
                }
                1 => {
                    t.rec(&k, Direction::In, Some(&tcp(rng(), TCP_RST, 0)), 54, ts);
                    bytes += 54;
                }
                2 => {
                    let mut o = owner(port, step as i32, ["r1", "r2", "r3"][(rng() % 3) as usize], "d");
                    o.started_us = ts.ts_us;
                    t.register_owner(o, SERVER);
                }
                3 => t.end_owner(&owner(port, 0, "", "").key, t.owner(&k.owner_key()).map_or(0, |o| o.pid), ts.ts_us),
                4 => {
                    t.sweep(ts.ts_us, 2_000_000, 30_000_000, 3);
                }
                _ => {
                    t.rec(&k, Direction::In, Some(&tcp(rng(), TCP_ACK, 10)), 64, ts);
                    bytes += 64;
                }
            }
            let mut roles = t.view().totals(true);
            roles.push(t.view().unauthenticated());
            let sum: u64 = roles.iter().map(|r| r.counters.bytes_in).sum();
            assert_eq!(sum, bytes, "step {step}");
            // Every SYN of a flow not yet counted is a connection; a flow counts once.
            let conns: u64 = roles.iter().map(|r| r.connections).sum();
            assert!(conns <= syns, "step {step}");
            let dbs: u64 = t.view().totals(false).iter().map(|r| r.counters.bytes_in).sum();
            assert_eq!(dbs + t.view().unauthenticated().counters.bytes_in, bytes, "step {step}");
            assert_eq!(t.header.count as usize, t.flows.iter().filter(|f| f.in_use).count(), "step {step}");
            assert_eq!(t.header.owner_count as usize, t.owners.iter().filter(|o| o.in_use).count(), "step {step}");
        }
        assert!(t.header.evictions > 0 && t.header.folded > t.header.evictions);
    }

    #[test]
    fn saved_totals_go_back_by_name_and_add_to_what_was_counted_meanwhile() {
        let mut st = Storage::new(4, 4);
        let mut t = st.table();
        // Counted before the load: a row for "bob" already exists, in the first named row.
        let bob = name_bytes(b"bob");
        let at = totals::row_for(t.roles, &bob);
        assert_eq!(at, 2);
        t.roles[2].counters.bytes_out = 5;
        t.roles[1].counters.bytes_out = 3;
        let saved = |name: &str, bytes_out: u64| Totals {
            in_use: !name.is_empty(),
            name: name_bytes(name.as_bytes()),
            connections: 1,
            counters: Counters { bytes_out, ..Counters::default() },
            ..Totals::default()
        };
        let rows = [(0, saved("", 7)), (1, saved("", 11)), (4, saved("alice", 100)), (2, saved("bob", 20))];
        t.restore_totals(&rows, &[], [1, 2, 3], 42);
        let by_name: Vec<(String, u64)> =
            totals::visible(t.roles).iter().map(|r| (name_str(&r.name).to_string(), r.counters.bytes_out)).collect();
        assert_eq!(by_name, vec![("".into(), 7), ("bob".into(), 25), ("alice".into(), 100)]);
        assert_eq!(t.view().unauthenticated().counters.bytes_out, 14, "the unnamed row of failed logins to itself");
        assert_eq!(
            (t.header.evictions, t.header.folded, t.header.owner_overflow, t.header.stats_reset_us),
            (1, 2, 3, 42)
        );
        // A name whose figures are all zero is not saved: rows never fill up for good.
        t.roles[3].clear();
        let kept: Vec<u16> = t.view().saved_rows(true).iter().map(|r| r.0).collect();
        assert_eq!(kept, vec![0, 1, 2]);
    }
}
