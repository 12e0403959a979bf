//! Per-connection figures from the backends' own sockets, and their totals per role,
//! database, application, peer class and backend type — what a server without
//! CAP_NET_RAW can still tell. Pure: the glue is in the extension's `stmt_hooks/` / `stmtshm.rs`.
//!
//! Each TCP backend takes a slot when it authenticates and writes its socket's counters
//! (`tcp_info`, since the socket was accepted: setup included) into it whenever it
//! charges a statement. When it exits, what its connection moved since the last reset is
//! added to the row of its key (`AppKey`) and the slot is freed. The totals a view shows
//! are those rows plus the live slots, so a connection counts as soon as it has spoken.
//!
//! Rows are bounded (`APP_ROWS`): application names come from clients, and a client can
//! make up any number of them. A key that finds every row taken is added to row 0 (all
//! names empty) and counted in `app_overflow`, so the totals still hold every byte.

use crate::flows::NAME_LEN;
use crate::statements::Sample;
use std::collections::HashMap;

/// Rows kept for (role, database, application, peer class, backend type) totals.
pub const APP_ROWS: usize = 1024;

/// A socket's counters as the kernel keeps them (TCP payload bytes, segments).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Socket {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub segments_in: u64,
    pub segments_out: u64,
    pub retransmits: u64,
    /// The kernel's smoothed RTT at the reading, microseconds (not summed).
    pub rtt_us: u64,
}

impl Socket {
    pub fn from_sample(s: &Sample) -> Socket {
        Socket {
            bytes_in: s.bytes_in.unwrap_or(0),
            bytes_out: s.bytes_out.unwrap_or(0),
            segments_in: s.segs_in.unwrap_or(0) as u64,
            segments_out: s.segs_out.unwrap_or(0) as u64,
            retransmits: s.retrans.unwrap_or(0) as u64,
            rtt_us: s.rtt_us.unwrap_or(0) as u64,
        }
    }

    /// What was counted after `base` (a reading taken earlier on the same socket).
    pub fn since(&self, base: &Socket) -> Socket {
        Socket {
            bytes_in: self.bytes_in.saturating_sub(base.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(base.bytes_out),
            segments_in: self.segments_in.saturating_sub(base.segments_in),
            segments_out: self.segments_out.saturating_sub(base.segments_out),
            retransmits: self.retransmits.saturating_sub(base.retransmits),
            rtt_us: self.rtt_us,
        }
    }

    fn add(&mut self, o: &Socket) {
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.segments_in += o.segments_in;
        self.segments_out += o.segments_out;
        self.retransmits += o.retransmits;
    }

    fn is_zero(&self) -> bool {
        self.bytes_in == 0 && self.bytes_out == 0 && self.segments_in == 0 && self.segments_out == 0
    }
}

/// What the totals are kept by. Names as the startup packet gave them (role and
/// database as the client spelled them, which is how PostgreSQL matched them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AppKey {
    pub role: [u8; NAME_LEN],
    pub database: [u8; NAME_LEN],
    pub application: [u8; NAME_LEN],
    /// `peer::PeerClass` and `peer::BackendKind` as numbers.
    pub peer_class: u8,
    pub kind: u8,
}

impl Default for AppKey {
    fn default() -> AppKey {
        AppKey { role: [0; NAME_LEN], database: [0; NAME_LEN], application: [0; NAME_LEN], peer_class: 0, kind: 0 }
    }
}

impl AppKey {
    /// The overflow row's key (every name empty); also what row 0 shows.
    pub fn is_overflow(&self) -> bool {
        self.role[0] == 0 && self.database[0] == 0 && self.application[0] == 0
    }
}

/// One live connection, written by its own backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Conn {
    pub in_use: bool,
    pub pid: i32,
    pub key: AppKey,
    pub client_addr: [u8; 16],
    pub ipv6: bool,
    pub client_port: u16,
    pub started_us: i64,
    /// The latest reading.
    pub socket: Socket,
    /// The reading at the last pg_netstat_reset() (zero before): the totals count from it.
    pub base: Socket,
    /// Next free slot plus 1, while free.
    pub next_free: u32,
}

/// Totals of ended connections for one key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppRow {
    pub in_use: bool,
    pub key: AppKey,
    pub connections: u64,
    pub socket: Socket,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnHeader {
    /// Slots from here on were never used.
    never_used: u32,
    /// First free slot plus 1 (0: none).
    free_head: u32,
    /// Backends that found every slot taken: their figures reach the totals when they
    /// exit, not while they run.
    pub slot_overflow: u64,
    /// Ended connections whose key found every row taken (their figures are in row 0).
    pub app_overflow: u64,
    pub stats_reset_us: i64,
}

pub struct Conns<'a> {
    pub header: &'a mut ConnHeader,
    pub slots: &'a mut [Conn],
    pub apps: &'a mut [AppRow],
}

/// A slot, as the backend that holds it knows it: position and its own PID (a slot
/// freed by a reset-proof path and taken again is never written by its old holder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotId {
    pub pos: u32,
    pub pid: i32,
}

impl Conns<'_> {
    /// Takes a slot for a backend's connection; `None` when every slot is taken.
    pub fn open(&mut self, conn: Conn) -> Option<SlotId> {
        let pos = if let Some(p) = (self.header.free_head as usize).checked_sub(1) {
            self.header.free_head = self.slots[p].next_free;
            p
        } else if (self.header.never_used as usize) < self.slots.len() {
            self.header.never_used += 1;
            self.header.never_used as usize - 1
        } else {
            self.header.slot_overflow += 1;
            return None;
        };
        self.slots[pos] = Conn { in_use: true, next_free: 0, base: Socket::default(), ..conn };
        Some(SlotId { pos: pos as u32, pid: conn.pid })
    }

    fn slot_mut(&mut self, id: SlotId) -> Option<&mut Conn> {
        self.slots.get_mut(id.pos as usize).filter(|c| c.in_use && c.pid == id.pid)
    }

    /// The backend's latest reading.
    pub fn update(&mut self, id: SlotId, socket: Socket) {
        if let Some(c) = self.slot_mut(id) {
            c.socket = socket;
        }
    }

    /// The backend exits with its last reading: what its connection moved since the
    /// last reset goes to its key's row, and the slot is freed. Without a slot
    /// (`None`: every slot was taken) everything it moved is added.
    /// `last` `None`: the latest reading in the slot is the last one.
    pub fn close(&mut self, id: Option<SlotId>, key: &AppKey, last: Option<Socket>) {
        let held = id.filter(|&i| self.slot_mut(i).is_some());
        let (base, last) = match held {
            Some(i) => {
                let pos = i.pos as usize;
                let (base, latest) = (self.slots[pos].base, self.slots[pos].socket);
                self.slots[pos] = Conn { next_free: self.header.free_head, ..Conn::default() };
                self.header.free_head = i.pos + 1;
                (base, last.unwrap_or(latest))
            }
            None => (Socket::default(), last.unwrap_or_default()),
        };
        let row = self.row_for(key);
        let r = &mut self.apps[row];
        r.connections += 1;
        r.socket.add(&last.since(&base));
    }

    /// The row of `key`, taking a free row for a new key; 0 when every row is taken.
    /// A scan of at most `APP_ROWS` rows, once per ended connection.
    fn row_for(&mut self, key: &AppKey) -> usize {
        if key.is_overflow() {
            return 0;
        }
        if let Some(p) = self.apps.iter().skip(1).position(|r| r.in_use && r.key == *key) {
            return p + 1;
        }
        match self.apps.iter().skip(1).position(|r| !r.in_use) {
            Some(p) => {
                self.apps[p + 1] = AppRow { in_use: true, key: *key, ..AppRow::default() };
                p + 1
            }
            None => {
                self.header.app_overflow += 1;
                0
            }
        }
    }

    /// pg_netstat_reset(): the totals start again from zero; live connections count
    /// from their current reading.
    pub fn reset(&mut self, now_us: i64) {
        self.apps.fill(AppRow::default());
        for c in self.slots.iter_mut().filter(|c| c.in_use) {
            c.base = c.socket;
        }
        self.header.app_overflow = 0;
        self.header.slot_overflow = 0;
        self.header.stats_reset_us = now_us;
    }

    /// Puts back totals saved before a restart (each to the row of its key; the
    /// overflow row and keys that find no row to row 0) and the table's counters.
    pub fn restore(&mut self, rows: &[AppRow], app_overflow: u64, stats_reset_us: i64) {
        for r in rows {
            let at = self.row_for(&r.key);
            self.apps[at].connections += r.connections;
            self.apps[at].socket.add(&r.socket);
        }
        self.header.app_overflow += app_overflow;
        if stats_reset_us != 0 {
            self.header.stats_reset_us = stats_reset_us;
        }
    }
}

/// Totals as the views show them: ended connections' rows plus every live connection
/// (since the last reset), one row per key, row 0's figures under the empty key. Live
/// connections count as connections once they have moved a byte.
pub fn totals(apps: &[AppRow], slots: &[Conn]) -> Vec<AppRow> {
    let mut by_key: HashMap<AppKey, AppRow> = HashMap::new();
    for (i, r) in apps.iter().enumerate() {
        if r.in_use || (i == 0 && (r.connections > 0 || !r.socket.is_zero())) {
            let key = if i == 0 { AppKey::default() } else { r.key };
            let e = by_key.entry(key).or_insert(AppRow { in_use: true, key, ..AppRow::default() });
            e.connections += r.connections;
            e.socket.add(&r.socket);
        }
    }
    for c in slots.iter().filter(|c| c.in_use) {
        let moved = c.socket.since(&c.base);
        if moved.is_zero() {
            continue;
        }
        let e = by_key.entry(c.key).or_insert(AppRow { in_use: true, key: c.key, ..AppRow::default() });
        e.connections += 1;
        e.socket.add(&moved);
    }
    let mut rows: Vec<AppRow> = by_key.into_values().collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.socket.bytes_out, r.socket.bytes_in)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::name_bytes;

    struct Owned {
        header: ConnHeader,
        slots: Vec<Conn>,
        apps: Vec<AppRow>,
    }

    impl Owned {
        fn new(slots: usize, apps: usize) -> Owned {
            Owned {
                header: ConnHeader::default(),
                slots: vec![Conn::default(); slots],
                apps: vec![AppRow::default(); apps],
            }
        }
        fn t(&mut self) -> Conns<'_> {
            Conns { header: &mut self.header, slots: &mut self.slots, apps: &mut self.apps }
        }
        fn totals(&self) -> Vec<AppRow> {
            totals(&self.apps, &self.slots)
        }
    }

    fn key(role: &str, app: &str) -> AppKey {
        AppKey {
            role: name_bytes(role.as_bytes()),
            database: name_bytes(b"db"),
            application: name_bytes(app.as_bytes()),
            peer_class: 0,
            kind: 1,
        }
    }

    fn conn(pid: i32, k: AppKey) -> Conn {
        Conn { pid, key: k, client_port: pid as u16, ..Conn::default() }
    }

    fn sock(i: u64, o: u64) -> Socket {
        Socket { bytes_in: i, bytes_out: o, segments_in: 1, segments_out: 1, ..Socket::default() }
    }

    fn total_bytes(rows: &[AppRow]) -> (u64, u64) {
        rows.iter().fold((0, 0), |(i, o), r| (i + r.socket.bytes_in, o + r.socket.bytes_out))
    }

    #[test]
    fn sizes_are_the_documented_ones() {
        // docs/how-it-works.md gives these (shared memory per slot and per row).
        assert_eq!((std::mem::size_of::<Conn>(), std::mem::size_of::<AppRow>()), (336, 256));
    }

    #[test]
    fn live_and_ended_connections_add_up_per_key() {
        let mut o = Owned::new(4, 8);
        let a = o.t().open(conn(1, key("alice", "web"))).unwrap();
        let b = o.t().open(conn(2, key("alice", "web"))).unwrap();
        o.t().update(a, sock(100, 1000));
        o.t().update(b, sock(10, 20));
        let rows = o.totals();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].connections, rows[0].socket.bytes_in, rows[0].socket.bytes_out), (2, 110, 1020));
        o.t().close(Some(a), &key("alice", "web"), Some(sock(150, 2000)));
        let rows = o.totals();
        assert_eq!((rows[0].connections, rows[0].socket.bytes_in, rows[0].socket.bytes_out), (2, 160, 2020));
        // The freed slot is taken again; the old holder's id no longer writes to it.
        let c = o.t().open(conn(3, key("bob", "etl"))).unwrap();
        assert_eq!(c.pos, a.pos);
        o.t().update(a, sock(999, 999));
        o.t().update(c, sock(5, 5_000_000));
        let rows = o.totals();
        assert_eq!(name_str(&rows[0].key.role), "bob");
        assert_eq!(total_bytes(&rows), (165, 5_002_020));
    }

    fn name_str(b: &[u8]) -> &str {
        crate::flows::name_str(b)
    }

    #[test]
    fn reset_counts_live_connections_from_their_reading_then() {
        let mut o = Owned::new(2, 4);
        let a = o.t().open(conn(1, key("alice", "web"))).unwrap();
        o.t().update(a, sock(100, 1000));
        o.t().close(None, &key("carol", "x"), Some(sock(7, 7)));
        o.t().reset(42);
        assert!(o.totals().is_empty());
        o.t().update(a, sock(130, 1500));
        assert_eq!(total_bytes(&o.totals()), (30, 500));
        o.t().close(Some(a), &key("alice", "web"), Some(sock(140, 1600)));
        assert_eq!(total_bytes(&o.totals()), (40, 600));
        assert_eq!(o.header.stats_reset_us, 42);
    }

    #[test]
    fn full_slots_and_full_rows_lose_no_byte() {
        let mut o = Owned::new(1, 3);
        let a = o.t().open(conn(1, key("a", "1"))).unwrap();
        assert!(o.t().open(conn(2, key("b", "2"))).is_none(), "one slot only");
        assert_eq!(o.header.slot_overflow, 1);
        o.t().close(None, &key("b", "2"), Some(sock(1, 2)));
        o.t().close(None, &key("c", "3"), Some(sock(10, 20)));
        // Rows 1 and 2 are taken now: a fourth key goes to row 0.
        o.t().close(None, &key("d", "4"), Some(sock(100, 200)));
        o.t().close(Some(a), &key("a", "1"), Some(sock(1000, 2000)));
        assert_eq!(o.header.app_overflow, 2);
        let rows = o.totals();
        assert_eq!(total_bytes(&rows), (1111, 2222));
        let overflow = rows.iter().find(|r| r.key.is_overflow()).unwrap();
        assert_eq!((overflow.connections, overflow.socket.bytes_out), (2, 2200));
    }

    #[test]
    fn random_opens_updates_and_closes_keep_the_sum() {
        let mut o = Owned::new(8, 6);
        let mut rng = crate::capture::testframes::xorshift(7);
        let mut live: Vec<(SlotId, AppKey, Socket)> = Vec::new();
        let mut without_slot: Vec<(AppKey, Socket)> = Vec::new();
        let mut ended = (0u64, 0u64);
        for step in 0..5000 {
            match rng() % 4 {
                0 => {
                    let k = key(&format!("r{}", rng() % 5), &format!("app{}", rng() % 3));
                    match o.t().open(conn(step, k)) {
                        Some(id) => live.push((id, k, Socket::default())),
                        None => without_slot.push((k, Socket::default())),
                    }
                }
                1 | 2 if !live.is_empty() => {
                    let i = (rng() as usize) % live.len();
                    let (id, _, s) = &mut live[i];
                    *s = Socket {
                        bytes_in: s.bytes_in + (rng() % 100) as u64,
                        bytes_out: s.bytes_out + (rng() % 1000) as u64,
                        ..*s
                    };
                    let (id, s) = (*id, *s);
                    o.t().update(id, s);
                }
                _ if !live.is_empty() => {
                    let (id, k, s) = live.swap_remove((rng() as usize) % live.len());
                    let last = Socket { bytes_out: s.bytes_out + 3, ..s };
                    o.t().close(Some(id), &k, Some(last));
                    ended = (ended.0 + last.bytes_in, ended.1 + last.bytes_out);
                }
                _ => {
                    if let Some((k, _)) = without_slot.pop() {
                        o.t().close(None, &k, Some(sock(1, 1)));
                        ended = (ended.0 + 1, ended.1 + 1);
                    }
                }
            }
            let want = live.iter().fold(ended, |(i, o), (_, _, s)| (i + s.bytes_in, o + s.bytes_out));
            assert_eq!(total_bytes(&o.totals()), want, "step {step}");
        }
    }
}
