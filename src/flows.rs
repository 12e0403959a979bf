//! Per-connection accounting, free of PostgreSQL: a bounded table of TCP flows keyed by
//! device and 4-tuple, their TCP health, who owns them (filled in by the backends), and
//! per-role / per-database totals that outlive the flows. The worker owns the table; it
//! lives in shared memory (see `flowshm`) but everything here works on plain slices, so
//! the unit tests drive it with vectors.
//!
//! Eviction policy, when a new flow finds the table full: a flow already closed (FIN both
//! ways or RST) goes first, the one closed longest ago; otherwise the flow seen least
//! recently. Either way its figures are folded into the role and database totals first,
//! so bytes are never lost, only the per-connection detail; `evictions` counts these.

use crate::capture::packet::{PacketMeta, TcpFields, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::capture::Direction;
use crate::stats::{align, Counters};

/// PostgreSQL's NAMEDATALEN: role and database names fit, NUL included.
pub const NAME_LEN: usize = 64;
/// Rows kept for roles and for databases; what does not fit goes to the "other" row.
pub const TOTALS_ROWS: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    /// Network device name, NUL-padded (IFNAMSIZ).
    pub device: [u8; 16],
    pub ipv6: bool,
}

impl FlowKey {
    /// The flow a packet belongs to. The server side is the one on one of our ports;
    /// when both or neither are, the direction decides ("in" comes from the client).
    pub fn of(device: [u8; 16], dir: Direction, m: &PacketMeta, ports: &[u16]) -> FlowKey {
        let (src_ours, dst_ours) = (ports.contains(&m.src_port), ports.contains(&m.dst_port));
        let from_client = if src_ours != dst_ours { dst_ours } else { dir == Direction::In };
        let (client_addr, client_port, server_addr, server_port) = if from_client {
            (m.src_addr, m.src_port, m.dst_addr, m.dst_port)
        } else {
            (m.dst_addr, m.dst_port, m.src_addr, m.src_port)
        };
        FlowKey { client_addr, server_addr, client_port, server_port, device, ipv6: m.ipv6 }
    }

    fn hash(&self) -> u64 {
        // Multiply-rotate over 8-byte words (as rustc's FxHash does): a handful of
        // instructions per key, where a byte-wise hash cost more than the rest of the
        // per-packet work. Keys are not secret; a collision only lengthens a probe.
        let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
        let ports = (self.client_port as u64) << 32 | (self.server_port as u64) << 16 | self.ipv6 as u64;
        let mut h = 0u64;
        for w in [
            word(&self.client_addr[..8]),
            word(&self.client_addr[8..]),
            word(&self.server_addr[..8]),
            word(&self.server_addr[8..]),
            word(&self.device[..8]),
            word(&self.device[8..]),
            ports,
        ] {
            h = (h.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
        h ^ (h >> 29)
    }

    /// Same connection as seen by the backend: client address and port, server port.
    /// The device is not known to a backend, and the server address may be a wildcard
    /// the backend reports differently (IPv4-mapped), so it is left out.
    pub fn same_connection(&self, o: &OwnerKey) -> bool {
        self.client_port == o.client_port
            && self.server_port == o.server_port
            && self.ipv6 == o.ipv6
            && self.client_addr == o.client_addr
    }
}

/// TCP events, per flow, per device interval, per role and database.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Connection attempts: SYN without ACK from a client.
    pub syn: u64,
    pub fin_in: u64,
    pub fin_out: u64,
    pub rst_in: u64,
    pub rst_out: u64,
    /// Data (or SYN/FIN) segments whose sequence range starts before the highest one
    /// already seen in that direction: retransmissions (and reordering, which a
    /// capture cannot tell apart).
    pub retrans_in: u64,
    pub retrans_out: u64,
    /// Segments advertising a zero receive window (the sender's receive buffer is full).
    pub zero_window_in: u64,
    pub zero_window_out: u64,
    /// Segments that filled a gap left earlier in the sequence space: reordered on the
    /// way, or re-sent after a loss before this host (whose first copy was never seen,
    /// so it is not a retransmission by the definition above).
    pub ooo_in: u64,
    pub ooo_out: u64,
}

impl TcpCounters {
    pub fn add(&mut self, o: &TcpCounters) {
        self.syn += o.syn;
        self.fin_in += o.fin_in;
        self.fin_out += o.fin_out;
        self.rst_in += o.rst_in;
        self.rst_out += o.rst_out;
        self.retrans_in += o.retrans_in;
        self.retrans_out += o.retrans_out;
        self.zero_window_in += o.zero_window_in;
        self.zero_window_out += o.zero_window_out;
        self.ooo_in += o.ooo_in;
        self.ooo_out += o.ooo_out;
    }

    pub fn sub(&self, o: &TcpCounters) -> TcpCounters {
        TcpCounters {
            syn: self.syn.saturating_sub(o.syn),
            fin_in: self.fin_in.saturating_sub(o.fin_in),
            fin_out: self.fin_out.saturating_sub(o.fin_out),
            rst_in: self.rst_in.saturating_sub(o.rst_in),
            rst_out: self.rst_out.saturating_sub(o.rst_out),
            retrans_in: self.retrans_in.saturating_sub(o.retrans_in),
            retrans_out: self.retrans_out.saturating_sub(o.retrans_out),
            zero_window_in: self.zero_window_in.saturating_sub(o.zero_window_in),
            zero_window_out: self.zero_window_out.saturating_sub(o.zero_window_out),
            ooo_in: self.ooo_in.saturating_sub(o.ooo_in),
            ooo_out: self.ooo_out.saturating_sub(o.ooo_out),
        }
    }
}

/// How the connection's backend came to be, as far as pg_netstat saw it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OwnerStatus {
    /// No backend registered this connection (yet): a port scan, a connection still
    /// authenticating, or one that began before the server started.
    #[default]
    Unknown = 0,
    Authenticated = 1,
    /// Authentication failed (wrong password...).
    AuthFailed = 2,
    /// Refused before authentication (pg_hba.conf "reject" or no matching line, too
    /// many connections, unknown database...).
    Rejected = 3,
}

impl OwnerStatus {
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            OwnerStatus::Unknown => None,
            OwnerStatus::Authenticated => Some("authenticated"),
            OwnerStatus::AuthFailed => Some("authentication failed"),
            OwnerStatus::Rejected => Some("rejected"),
        }
    }
}

pub fn name_bytes(s: &[u8]) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let n = s.len().min(NAME_LEN - 1);
    out[..n].copy_from_slice(&s[..n]);
    out
}

pub fn name_str(n: &[u8]) -> &str {
    let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
    std::str::from_utf8(&n[..end]).unwrap_or("?")
}

/// A device name as a flow key holds it.
pub fn device_bytes(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerKey {
    pub client_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub ipv6: bool,
}

/// A backend's own record of its connection, written when it authenticates (or is
/// refused) and marked ended when it exits.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub in_use: bool,
    pub key: OwnerKey,
    pub status: OwnerStatus,
    pub pid: i32,
    pub role: [u8; NAME_LEN],
    pub database: [u8; NAME_LEN],
    pub started_us: i64,
    /// 0 while the backend lives.
    pub ended_us: i64,
}

impl Default for Owner {
    fn default() -> Owner {
        Owner {
            in_use: false,
            key: OwnerKey::default(),
            status: OwnerStatus::Unknown,
            pid: 0,
            role: [0; NAME_LEN],
            database: [0; NAME_LEN],
            started_us: 0,
            ended_us: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub in_use: bool,
    pub key: FlowKey,
    /// Copied from the owner registry once the backend has registered; kept after the
    /// backend is gone so the flow can still be attributed when it is folded.
    pub status: OwnerStatus,
    pub pid: i32,
    pub role: [u8; NAME_LEN],
    pub database: [u8; NAME_LEN],
    pub total: Counters,
    pub tcp: TcpCounters,
    /// What had already been counted at the last pg_netstat_reset(), so the role and
    /// database totals restart from zero without touching the per-connection figures.
    pub base: Counters,
    pub base_tcp: TcpCounters,
    /// The interval packets are being counted in now, and the one before it.
    pub cur_start: i64,
    pub cur: Counters,
    pub prev_start: i64,
    pub prev: Counters,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
    /// When both FINs or a RST were seen; 0 while open.
    pub closed_us: i64,
    /// Per direction (0 = in, 1 = out): which sequence numbers were seen.
    seq: [SeqTrack; 2],
    fin_seen: [bool; 2],
    /// Which side sent the first FIN: 0 none yet, 1 the client, 2 the server.
    first_fin: u8,
    /// While free: the next free place + 1 (0 = none).
    next_free: u32,
}

impl Default for Flow {
    fn default() -> Flow {
        Flow {
            in_use: false,
            key: FlowKey::default(),
            status: OwnerStatus::Unknown,
            pid: 0,
            role: [0; NAME_LEN],
            database: [0; NAME_LEN],
            total: Counters::default(),
            tcp: TcpCounters::default(),
            base: Counters::default(),
            base_tcp: TcpCounters::default(),
            cur_start: 0,
            cur: Counters::default(),
            prev_start: 0,
            prev: Counters::default(),
            first_seen_us: 0,
            last_seen_us: 0,
            closed_us: 0,
            seq: [SeqTrack::default(); 2],
            fin_seen: [false; 2],
            first_fin: 0,
            next_free: 0,
        }
    }
}

impl Flow {
    /// Packets and bytes of the interval starting at `start`, if this flow still has it.
    pub fn interval(&self, start: i64) -> Counters {
        if self.cur_start == start {
            self.cur
        } else if self.prev_start == start {
            self.prev
        } else {
            Counters::default()
        }
    }

    /// How the connection ended, if it did.
    pub fn end_state(&self) -> Option<&'static str> {
        if self.tcp.rst_in > 0 {
            Some("reset by client")
        } else if self.tcp.rst_out > 0 {
            Some("reset by server")
        } else if self.fin_seen[0] && self.fin_seen[1] {
            Some(if self.first_fin == 2 { "closed by server" } else { "closed by client" })
        } else if self.fin_seen[0] {
            Some("closing (client sent FIN)")
        } else if self.fin_seen[1] {
            Some("closing (server sent FIN)")
        } else {
            None
        }
    }
}

/// One row of the per-role or per-database totals.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Totals {
    pub in_use: bool,
    /// Empty: connections with no known role (or database), and the overflow row.
    pub name: [u8; NAME_LEN],
    pub connections: u64,
    pub counters: Counters,
    pub tcp: TcpCounters,
}

impl Default for Totals {
    fn default() -> Totals {
        Totals { in_use: false, name: [0; NAME_LEN], connections: 0, counters: Counters::default(), tcp: TcpCounters::default() }
    }
}

impl Totals {
    /// Adds what a flow did since the last reset. It counts as a connection when its
    /// opening SYN was seen then: the tail of a flow pushed out of a full table, or one
    /// already open when capture began, adds traffic but no connection.
    pub fn add_flow(&mut self, f: &Flow) {
        self.counters.merge(&f.total.since(&f.base));
        let tcp = f.tcp.sub(&f.base_tcp);
        self.tcp.add(&tcp);
        self.connections += (tcp.syn > 0) as u64;
    }
}

fn totals_row<'a>(rows: &'a mut [Totals], name: &[u8; NAME_LEN]) -> &'a mut Totals {
    // Row 0 is reserved for "unknown / did not fit", so a full table still adds up.
    let pos = if name[0] == 0 {
        0
    } else {
        match rows.iter().position(|r| r.in_use && r.name == *name) {
            Some(p) => p,
            None => match rows.iter().skip(1).position(|r| !r.in_use) {
                Some(p) => {
                    rows[p + 1] = Totals { in_use: true, name: *name, ..Totals::default() };
                    p + 1
                }
                None => 0,
            },
        }
    };
    rows[0].in_use = true;
    &mut rows[pos]
}

/// Fixed-size bookkeeping at the head of the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    pub capacity: u32,
    pub count: u32,
    /// Flows pushed out because the table was full.
    pub evictions: u64,
    /// Flows folded into the totals and forgotten (closed, idle, or evicted).
    pub folded: u64,
    /// Owner records that found the registry full.
    pub owner_overflow: u64,
    pub stats_reset_us: i64,
    /// Set by a new owner record or a new flow, so the worker looks for owners only
    /// when there may be something to find.
    pub resolve_pending: bool,
    /// Free places: a list through `Flow::next_free` (head + 1, 0 = empty), then every
    /// place from `never_used` on. Zeroed memory is an empty table: nothing listed, all
    /// places never used. Taking or giving back a place is O(1).
    pub free_head: u32,
    pub never_used: u32,
    /// Position of the flow the last packet belonged to, plus 1 (0 = none): bulk
    /// transfers send long runs of packets of one flow, which then skip the hash.
    pub last_pos: u32,
}

/// The table over its storage. `index` has a power-of-two length of at least twice
/// `flows.len()`; its entries are flow positions + 1, 0 for empty (linear probing).
pub struct FlowTable<'a> {
    pub header: &'a mut Header,
    pub index: &'a mut [u32],
    pub flows: &'a mut [Flow],
    pub owners: &'a mut [Owner],
    pub roles: &'a mut [Totals],
    pub databases: &'a mut [Totals],
}

pub fn index_len(capacity: usize) -> usize {
    (capacity * 2).next_power_of_two().max(2)
}

fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Gaps remembered per direction. More simultaneous gaps than this (heavy loss or
/// reordering) forget the oldest; a segment filling a forgotten gap then counts as a
/// retransmission.
const MAX_GAPS: usize = 4;

/// The sequence numbers seen in one direction: everything below `high` except the gaps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SeqTrack {
    valid: bool,
    high: u32,
    gaps: u8,
    /// [start, end) of each gap; all lie below `high`.
    gap: [(u32, u32); MAX_GAPS],
}

impl SeqTrack {
    /// Position relative to `high` (negative below it), wrap-safe within 2 GiB.
    fn rel(&self, x: u32) -> i64 {
        x.wrapping_sub(self.high) as i32 as i64
    }

    fn add_gap(&mut self, start: u32, end: u32) {
        if self.gaps as usize == MAX_GAPS {
            let oldest = (0..MAX_GAPS).min_by_key(|&i| self.rel(self.gap[i].0)).unwrap_or(0);
            self.gap[oldest] = (start, end);
        } else {
            self.gap[self.gaps as usize] = (start, end);
            self.gaps += 1;
        }
    }

    /// Takes [a, b) (below `high`) out of the gaps; returns how many of its numbers
    /// were in a gap, i.e. never seen before.
    fn take_unseen(&mut self, a: u32, b: u32) -> i64 {
        let (ra, rb) = (self.rel(a), self.rel(b));
        let mut unseen = 0;
        let mut kept: [(u32, u32); MAX_GAPS * 2] = [(0, 0); MAX_GAPS * 2];
        let mut n = 0;
        for &(s, e) in &self.gap[..self.gaps as usize] {
            let (rs, re) = (self.rel(s), self.rel(e));
            let (lo, hi) = (ra.max(rs), rb.min(re));
            if lo >= hi {
                kept[n] = (s, e);
                n += 1;
                continue;
            }
            unseen += hi - lo;
            if rs < lo {
                kept[n] = (s, a);
                n += 1;
            }
            if hi < re {
                kept[n] = (b, e);
                n += 1;
            }
        }
        // A segment in the middle of a gap splits it in two; keep the newest gaps.
        kept[..n].sort_by_key(|&(s, _)| std::cmp::Reverse(self.rel(s)));
        let n = n.min(MAX_GAPS);
        self.gap[..n].copy_from_slice(&kept[..n]);
        self.gaps = n as u8;
        unseen
    }

    /// Records the segment [seq, end); returns (retransmission, out of order): a
    /// retransmission when part of it had been seen already, out of order when part of
    /// it fills a gap.
    fn segment(&mut self, seq: u32, end: u32) -> (bool, bool) {
        if !self.valid {
            *self = SeqTrack { valid: true, high: end, ..SeqTrack::default() };
            return (false, false);
        }
        if !seq_lt(seq, self.high) {
            if seq_lt(self.high, seq) {
                self.add_gap(self.high, seq);
            }
            self.high = end;
            return (false, false);
        }
        let below_end = if seq_lt(self.high, end) { self.high } else { end };
        let covered = self.rel(below_end) - self.rel(seq);
        let unseen = self.take_unseen(seq, below_end);
        if seq_lt(self.high, end) {
            self.high = end;
        }
        (unseen < covered, unseen > 0)
    }
}

/// Owned storage, for tests and for sizing.
#[derive(Default)]
pub struct Storage {
    pub header: Header,
    pub index: Vec<u32>,
    pub flows: Vec<Flow>,
    pub owners: Vec<Owner>,
    pub roles: Vec<Totals>,
    pub databases: Vec<Totals>,
}

impl Storage {
    pub fn new(capacity: usize) -> Storage {
        Storage {
            header: Header { capacity: capacity as u32, ..Header::default() },
            index: vec![0; index_len(capacity)],
            flows: vec![Flow::default(); capacity],
            owners: vec![Owner::default(); capacity],
            roles: vec![Totals::default(); TOTALS_ROWS],
            databases: vec![Totals::default(); TOTALS_ROWS],
        }
    }

    pub fn table(&mut self) -> FlowTable<'_> {
        FlowTable {
            header: &mut self.header,
            index: &mut self.index,
            flows: &mut self.flows,
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
    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    fn home(&self, key: &FlowKey) -> usize {
        key.hash() as usize & self.mask()
    }

    /// Index position holding `key`, or the empty position where it would go.
    fn probe(&self, key: &FlowKey) -> (usize, bool) {
        let mut i = self.home(key);
        loop {
            match self.index[i] {
                0 => return (i, false),
                v if self.flows[v as usize - 1].key == *key => return (i, true),
                _ => i = (i + 1) & self.mask(),
            }
        }
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        match self.probe(key) {
            (i, true) => Some(&self.flows[self.index[i] as usize - 1]),
            _ => None,
        }
    }

    /// Removes the index entry at `i`, shifting later entries of the same probe run
    /// back so lookups never stop at a hole (no tombstones).
    fn unlink(&mut self, mut i: usize) {
        let mask = self.mask();
        self.index[i] = 0;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let v = self.index[j];
            if v == 0 {
                return;
            }
            let k = self.home(&self.flows[v as usize - 1].key);
            // The entry at j may stay if its home lies cyclically in (i, j].
            let stays = if i <= j { i < k && k <= j } else { i < k || k <= j };
            if !stays {
                self.index[i] = v;
                self.index[j] = 0;
                i = j;
            }
        }
    }

    /// Folds a flow into the role and database totals and frees its place. A flow
    /// pushed out before the worker's next owner pass still gets its owner here.
    fn fold(&mut self, pos: usize) {
        let mut f = self.flows[pos];
        if let Some(o) = self.owner_of(&f) {
            (f.status, f.pid, f.role, f.database) = (o.status, o.pid, o.role, o.database);
        }
        totals_row(self.roles, &f.role).add_flow(&f);
        totals_row(self.databases, &f.database).add_flow(&f);
        let (i, found) = self.probe(&f.key);
        if found {
            self.unlink(i);
        }
        self.flows[pos] = Flow { next_free: self.header.free_head, ..Flow::default() };
        self.header.free_head = pos as u32 + 1;
        self.header.count -= 1;
        self.header.folded += 1;
    }

    /// The flow to push out of a full table (see the module comment).
    fn victim(&self) -> usize {
        let closed = self.flows.iter().enumerate().filter(|(_, f)| f.in_use && f.closed_us != 0).min_by_key(|(_, f)| f.closed_us);
        if let Some((p, _)) = closed {
            return p;
        }
        self.flows.iter().enumerate().filter(|(_, f)| f.in_use).min_by_key(|(_, f)| f.last_seen_us).map(|(p, _)| p).unwrap_or(0)
    }

    fn find_or_insert(&mut self, key: &FlowKey, now_us: i64) -> usize {
        if let Some(f) = (self.header.last_pos as usize).checked_sub(1).and_then(|p| self.flows.get(p)) {
            if f.in_use && f.key == *key {
                return self.header.last_pos as usize - 1;
            }
        }
        if let (i, true) = self.probe(key) {
            let pos = self.index[i] as usize - 1;
            self.header.last_pos = pos as u32 + 1;
            return pos;
        }
        if self.header.count as usize >= self.flows.len() {
            let v = self.victim();
            self.fold(v);
            self.header.evictions += 1;
        }
        let pos = match self.header.free_head {
            0 => {
                self.header.never_used += 1;
                self.header.never_used as usize - 1
            }
            head => {
                let p = head as usize - 1;
                self.header.free_head = self.flows[p].next_free;
                p
            }
        };
        self.flows[pos] = Flow { in_use: true, key: *key, first_seen_us: now_us, ..Flow::default() };
        let (i, _) = self.probe(key);
        self.index[i] = pos as u32 + 1;
        self.header.count += 1;
        self.header.last_pos = pos as u32 + 1;
        self.header.resolve_pending = true; // its owner may have registered already
        pos
    }

    /// Counts one packet of the flow `key`; returns the TCP events it carried, for the
    /// device's interval figures.
    pub fn record(&mut self, key: &FlowKey, dir: Direction, tcp: Option<&TcpFields>, wire_len: u32, clock: Clock) -> TcpCounters {
        let new_connection = tcp.is_some_and(|t| t.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN);
        if new_connection {
            // The same 4-tuple again after a close (a client port reused): a new
            // connection, not more of the old one.
            if let (i, true) = self.probe(key) {
                let pos = self.index[i] as usize - 1;
                if self.flows[pos].closed_us != 0 {
                    self.fold(pos);
                }
            }
        }
        let pos = self.find_or_insert(key, clock.ts_us);
        let f = &mut self.flows[pos];
        let mut ev = TcpCounters::default();
        f.total.add(dir, wire_len as u64);
        f.last_seen_us = f.last_seen_us.max(clock.ts_us);
        let secs = clock.interval_secs.max(1) as i64;
        let ts_s = clock.ts_us.div_euclid(1_000_000);
        let start = if ts_s >= f.cur_start && ts_s < f.cur_start + secs { f.cur_start } else { align(ts_s, secs as u32) };
        if start > f.cur_start {
            (f.prev_start, f.prev) = (f.cur_start, f.cur);
            (f.cur_start, f.cur) = (start, Counters::default());
        }
        if start == f.cur_start {
            f.cur.add(dir, wire_len as u64);
        } else if start == f.prev_start {
            f.prev.add(dir, wire_len as u64);
        }
        let Some(t) = tcp else { return ev };
        let d = match dir {
            Direction::In => 0,
            Direction::Out => 1,
        };
        let (inbound, syn, fin, rst) =
            (d == 0, t.flags & TCP_SYN != 0, t.flags & TCP_FIN != 0, t.flags & TCP_RST != 0);
        if syn && t.flags & TCP_ACK == 0 && inbound {
            ev.syn += 1;
        }
        if rst {
            if inbound { ev.rst_in += 1 } else { ev.rst_out += 1 }
            if f.closed_us == 0 {
                f.closed_us = clock.ts_us;
            }
        } else {
            // Sequence space: SYN and FIN take one number each, data its length.
            let payload = t.payload_len(wire_len);
            let used = payload + syn as u32 + fin as u32;
            if used > 0 {
                let (retrans, ooo) = f.seq[d].segment(t.seq, t.seq.wrapping_add(used));
                if retrans {
                    if inbound { ev.retrans_in += 1 } else { ev.retrans_out += 1 }
                }
                if ooo {
                    if inbound { ev.ooo_in += 1 } else { ev.ooo_out += 1 }
                }
            }
            // A side that has sent its FIN closes its receive window when the
            // application lets go of the socket: that zero is the end, not a slow reader.
            if t.window == 0 && !syn && !fin && !f.fin_seen[d] {
                if inbound { ev.zero_window_in += 1 } else { ev.zero_window_out += 1 }
            }
            if fin && !f.fin_seen[d] {
                f.fin_seen[d] = true;
                if f.first_fin == 0 {
                    f.first_fin = d as u8 + 1;
                }
                if inbound { ev.fin_in += 1 } else { ev.fin_out += 1 }
                if f.fin_seen[0] && f.fin_seen[1] && f.closed_us == 0 {
                    f.closed_us = clock.ts_us;
                }
            }
        }
        f.tcp.add(&ev);
        ev
    }

    /// The owner record of a flow that has none copied in yet: the newest registration
    /// of the same connection (a client port reused after an earlier connection ended
    /// belongs to the newer backend).
    pub fn owner_of(&self, f: &Flow) -> Option<&Owner> {
        if f.status != OwnerStatus::Unknown {
            return None;
        }
        self.owners.iter().filter(|o| o.in_use && f.key.same_connection(&o.key)).max_by_key(|o| o.started_us)
    }

    /// Copies owner records into the flows that have none yet. Cheap when nothing
    /// changed: it runs only when a backend registered since the last call or a new
    /// flow appeared.
    pub fn resolve_owners(&mut self) {
        if !std::mem::take(&mut self.header.resolve_pending) {
            return;
        }
        for pos in 0..self.flows.len() {
            let f = &self.flows[pos];
            if !f.in_use {
                continue;
            }
            let Some(o) = self.owner_of(f).copied() else { continue };
            let f = &mut self.flows[pos];
            f.status = o.status;
            f.pid = o.pid;
            f.role = o.role;
            f.database = o.database;
        }
    }

    /// Folds and forgets flows closed more than `linger_us` ago or idle longer than
    /// `idle_us` (0 = never); forgets owner records of backends gone over a minute.
    pub fn sweep(&mut self, now_us: i64, linger_us: i64, idle_us: i64) {
        for pos in 0..self.flows.len() {
            let f = &self.flows[pos];
            if !f.in_use {
                continue;
            }
            let closed = f.closed_us != 0 && now_us - f.closed_us > linger_us;
            let idle = idle_us > 0 && now_us - f.last_seen_us > idle_us;
            if closed || idle {
                self.fold(pos);
            }
        }
        for o in self.owners.iter_mut() {
            if o.in_use && o.ended_us != 0 && now_us - o.ended_us > 60_000_000 {
                *o = Owner::default();
            }
        }
    }

    /// pg_netstat_reset(): role and database totals start again from zero; the flows
    /// keep their own figures but count towards the totals only from here.
    pub fn reset(&mut self, now_us: i64) {
        for r in self.roles.iter_mut().chain(self.databases.iter_mut()) {
            *r = Totals::default();
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

    /// The totals as the views show them: what was folded plus what live flows added
    /// since the reset. `by_role` picks roles or databases.
    pub fn totals_with_live(&self, by_role: bool) -> Vec<Totals> {
        let mut rows: Vec<Totals> = if by_role { self.roles.to_vec() } else { self.databases.to_vec() };
        for f in self.flows.iter().filter(|f| f.in_use) {
            let name = if by_role { &f.role } else { &f.database };
            let owner = self.owner_of(f);
            let name = match owner {
                Some(o) if by_role => &o.role,
                Some(o) => &o.database,
                None => name,
            };
            totals_row(&mut rows, name).add_flow(f);
        }
        rows.retain(|r| r.in_use && (r.connections > 0 || r.counters.packets() > 0 || r.name[0] != 0));
        rows
    }
}

/// Records a backend's connection in the owner registry. A full registry drops the
/// oldest record of an ended backend; with none ended, the record is lost and counted.
pub fn register_owner(t: &mut FlowTable<'_>, owner: Owner) {
    let pos = t
        .owners
        .iter()
        .position(|o| o.in_use && o.key == owner.key && o.pid == owner.pid)
        .or_else(|| t.owners.iter().position(|o| !o.in_use))
        .or_else(|| {
            t.owners.iter().enumerate().filter(|(_, o)| o.ended_us != 0).min_by_key(|(_, o)| o.ended_us).map(|(p, _)| p)
        });
    match pos {
        Some(p) => {
            t.owners[p] = Owner { in_use: true, ..owner };
            t.header.resolve_pending = true;
        }
        None => t.header.owner_overflow += 1,
    }
}

pub fn end_owner(t: &mut FlowTable<'_>, key: &OwnerKey, pid: i32, now_us: i64) {
    for o in t.owners.iter_mut().filter(|o| o.in_use && o.key == *key && o.pid == pid && o.ended_us == 0) {
        o.ended_us = now_us;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            started_us: 1,
            ended_us: 0,
        }
    }

    #[test]
    fn a_connection_from_syn_to_fin() {
        let mut s = Storage::new(8);
        let mut t = s.table();
        let k = key(40000);
        let ack = TCP_ACK;
        let ev = t.record(&k, Direction::In, Some(&tcp(100, TCP_SYN, 0)), 74, at(1000));
        assert_eq!(ev.syn, 1);
        t.record(&k, Direction::Out, Some(&tcp(900, TCP_SYN | ack, 0)), 74, at(1000));
        t.record(&k, Direction::In, Some(&tcp(101, ack, 50)), 104, at(1001));
        t.record(&k, Direction::Out, Some(&tcp(901, ack, 1000)), 1054, at(1001));
        t.record(&k, Direction::In, Some(&tcp(151, TCP_FIN | ack, 0)), 54, at(1002));
        t.record(&k, Direction::Out, Some(&tcp(1901, TCP_FIN | ack, 0)), 54, at(1002));
        let f = *t.get(&k).unwrap();
        assert_eq!((f.total.packets_in, f.total.packets_out, f.total.bytes_in, f.total.bytes_out), (3, 3, 232, 1182));
        assert_eq!((f.tcp.syn, f.tcp.fin_in, f.tcp.fin_out, f.tcp.retrans_in, f.tcp.retrans_out), (1, 1, 1, 0, 0));
        assert_eq!(f.closed_us, 1002_000_000);
        assert_eq!(f.end_state(), Some("closed by client"));
        assert_eq!(f.interval(1000).packets(), 6);
    }

    #[test]
    fn retransmissions_partial_and_whole_but_not_keepalives() {
        let mut s = Storage::new(8);
        let mut t = s.table();
        let k = key(40001);
        t.record(&k, Direction::Out, Some(&tcp(1000, TCP_ACK, 100)), 154, at(1));
        assert_eq!(t.record(&k, Direction::Out, Some(&tcp(1000, TCP_ACK, 100)), 154, at(1)).retrans_out, 1);
        assert_eq!(t.record(&k, Direction::Out, Some(&tcp(1050, TCP_ACK, 100)), 154, at(1)).retrans_out, 1);
        assert_eq!(t.record(&k, Direction::Out, Some(&tcp(1150, TCP_ACK, 100)), 154, at(1)).retrans_out, 0);
        // A keep-alive probe: one below the next sequence number, no data.
        assert_eq!(t.record(&k, Direction::Out, Some(&tcp(1249, TCP_ACK, 0)), 54, at(1)).retrans_out, 0);
        // Pure ACKs the other way never count.
        assert_eq!(t.record(&k, Direction::In, Some(&tcp(7, TCP_ACK, 0)), 54, at(1)).retrans_in, 0);
        assert_eq!(t.record(&k, Direction::In, Some(&tcp(7, TCP_ACK, 0)), 54, at(1)).retrans_in, 0);
        // Across the 2^32 wrap.
        let k2 = key(40002);
        t.record(&k2, Direction::In, Some(&tcp(u32::MAX - 10, TCP_ACK, 100)), 154, at(1));
        assert_eq!(t.record(&k2, Direction::In, Some(&tcp(89, TCP_ACK, 100)), 154, at(1)).retrans_in, 0);
        assert_eq!(t.record(&k2, Direction::In, Some(&tcp(u32::MAX - 10, TCP_ACK, 100)), 154, at(1)).retrans_in, 1);
    }

    #[test]
    fn reordering_is_out_of_order_not_retransmission() {
        let mut s = Storage::new(8);
        let mut t = s.table();
        let k = key(40004);
        let seg = |t: &mut FlowTable<'_>, seq| t.record(&k, Direction::In, Some(&tcp(seq, TCP_ACK, 100)), 154, at(1));
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
    fn too_many_gaps_forget_the_oldest() {
        let mut tr = SeqTrack::default();
        tr.segment(0, 10);
        for i in 1..=6u32 {
            tr.segment(i * 20, i * 20 + 10); // gaps [10,20), [30,40), ...
        }
        assert_eq!(tr.gaps as usize, MAX_GAPS);
        assert_eq!(tr.segment(110, 120), (false, true)); // a remembered gap
        assert_eq!(tr.segment(10, 20), (true, false)); // forgotten: counted as seen
    }

    #[test]
    fn zero_windows_and_resets() {
        let mut s = Storage::new(8);
        let mut t = s.table();
        let k = key(40003);
        let mut z = tcp(5, TCP_ACK, 0);
        z.window = 0;
        assert_eq!(t.record(&k, Direction::In, Some(&z), 54, at(1)).zero_window_in, 1);
        // A zero window after the sender's own FIN is the socket closing, not a full
        // receive buffer.
        let k2 = key(40005);
        let mut fin = tcp(9, TCP_FIN | TCP_ACK, 0);
        t.record(&k2, Direction::Out, Some(&fin), 54, at(1));
        fin.flags = TCP_ACK;
        fin.window = 0;
        assert_eq!(t.record(&k2, Direction::Out, Some(&fin), 54, at(1)).zero_window_out, 0);
        // A RST commonly carries window 0: that is not a full receive buffer.
        z.flags = TCP_RST;
        let ev = t.record(&k, Direction::In, Some(&z), 54, at(2));
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
        let mut s = Storage::new(8);
        let mut t = s.table();
        let (a, b) = (key(40010), key(40011));
        t.record(&a, Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        t.record(&b, Direction::In, Some(&tcp(1, TCP_SYN, 0)), 74, at(1));
        register_owner(&mut t, owner(40010, 111, "alice", "sales"));
        t.resolve_owners();
        assert_eq!(name_str(&t.get(&a).unwrap().role), "alice");
        assert_eq!(t.get(&b).unwrap().status, OwnerStatus::Unknown);
        t.record(&a, Direction::Out, Some(&tcp(1, TCP_ACK, 500)), 554, at(2));
        t.record(&a, Direction::In, Some(&tcp(2, TCP_RST, 0)), 54, at(3));
        end_owner(&mut t, &owner(40010, 111, "", "").key, 111, 3_000_000);
        // Live: the role's totals already include the flow.
        let roles = t.totals_with_live(true);
        let alice = roles.iter().find(|r| name_str(&r.name) == "alice").unwrap();
        assert_eq!((alice.connections, alice.counters.bytes_out, alice.tcp.rst_in), (1, 554, 1));
        // Folded after the linger: same figures, flow gone.
        t.sweep(10_000_000, 5_000_000, 0);
        assert!(t.get(&a).is_none());
        assert_eq!(t.header.count, 1);
        let roles = t.totals_with_live(true);
        let alice = roles.iter().find(|r| name_str(&r.name) == "alice").unwrap();
        assert_eq!((alice.connections, alice.counters.bytes_out, alice.counters.packets()), (1, 554, 3));
        let unknown = roles.iter().find(|r| r.name[0] == 0).unwrap();
        assert_eq!((unknown.connections, unknown.counters.packets_in), (1, 1));
        let dbs = t.totals_with_live(false);
        assert_eq!(dbs.iter().find(|r| name_str(&r.name) == "sales").unwrap().counters.bytes_in, 128);
        // Owner records of ended backends are forgotten a minute later.
        t.sweep(64_000_001, 5_000_000, 0);
        assert!(t.owners.iter().all(|o| !o.in_use));
    }

    #[test]
    fn reset_restarts_totals_but_not_connections() {
        let mut s = Storage::new(8);
        let mut t = s.table();
        let a = key(40020);
        t.record(&a, Direction::In, Some(&tcp(1, TCP_ACK, 10)), 64, at(1));
        t.reset(2_000_000);
        t.record(&a, Direction::In, Some(&tcp(11, TCP_ACK, 10)), 64, at(3));
        assert_eq!(t.get(&a).unwrap().total.packets_in, 2);
        let unknown = t.totals_with_live(true)[0];
        assert_eq!((unknown.counters.packets_in, unknown.connections), (1, 0));
    }

    #[test]
    fn full_table_evicts_closed_then_least_recent_and_keeps_every_byte() {
        let mut s = Storage::new(4);
        let mut t = s.table();
        for p in 0..4 {
            t.record(&key(41000 + p), Direction::In, Some(&tcp(1, TCP_ACK, 10)), 100, at(10 + p as i64));
        }
        t.record(&key(41002), Direction::In, Some(&tcp(11, TCP_RST, 0)), 54, at(20));
        t.record(&key(42000), Direction::In, None, 100, at(21));
        assert!(t.get(&key(41002)).is_none(), "the closed flow goes first");
        t.record(&key(42001), Direction::In, None, 100, at(22));
        assert!(t.get(&key(41000)).is_none(), "then the least recently seen");
        assert_eq!((t.header.count, t.header.evictions), (4, 2));
        for p in [41001, 41003, 42000, 42001] {
            assert!(t.get(&key(p)).is_some(), "{p}");
        }
        let all: u64 = t.totals_with_live(true).iter().map(|r| r.counters.bytes_in).sum();
        assert_eq!(all, 4 * 100 + 54 + 2 * 100);
    }

    #[test]
    fn the_index_survives_random_inserts_and_removals() {
        // Backward-shift deletion must keep every remaining key findable.
        let mut s = Storage::new(64);
        let mut t = s.table();
        let mut rng = crate::capture::testframes::xorshift(7);
        let mut live = std::collections::BTreeSet::new();
        for step in 0..5000 {
            let p = 30000 + (rng() % 200) as u16;
            if rng() % 3 == 0 {
                if let (i, true) = t.probe(&key(p)) {
                    let pos = t.index[i] as usize - 1;
                    t.fold(pos);
                    live.remove(&p);
                }
            } else {
                t.record(&key(p), Direction::In, None, 60, at(step));
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
}
