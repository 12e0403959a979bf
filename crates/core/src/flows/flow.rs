//! One TCP connection as the capture sees it on one device.

use super::key::{FlowKey, NAME_LEN};
use super::list::{Linked, Links};
use super::owners::OwnerStatus;
use super::seq::SeqTrack;
use super::totals::Contribution;
use crate::capture::packet::{TcpFields, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::capture::Direction;
use crate::counters::{Counters, TcpCounters, TcpEvents};
use crate::peer::BackendKind;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub in_use: bool,
    pub key: FlowKey,
    /// Copied from the owner registry once the backend has registered; kept after the
    /// backend is gone so the flow can still be attributed.
    pub status: OwnerStatus,
    pub pid: i32,
    pub role: [u8; NAME_LEN],
    pub database: [u8; NAME_LEN],
    pub application: [u8; NAME_LEN],
    pub kind: BackendKind,
    /// The row of the egress totals this flow counts into (`peer::egress_row`).
    pub egress_row: u8,
    /// The per-role and per-database totals rows this flow counts into (0 = unknown).
    pub role_row: u16,
    pub db_row: u16,
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
    pub(super) seq: [SeqTrack; 2],
    pub(super) fin_seen: [bool; 2],
    /// Which side sent the first FIN: 0 none yet, 1 the client, 2 the server.
    pub(super) first_fin: u8,
    /// The first packet seen was the client's SYN: the connection's backend can only
    /// have registered after it, which tells a reused client port's new owner from the
    /// old one.
    pub(super) opened_here: bool,
    /// Place in the table's open (least recently seen first) or closed list, or in its
    /// free list while not in use.
    pub(super) links: Links,
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
            application: [0; NAME_LEN],
            kind: BackendKind::Unknown,
            egress_row: 0,
            role_row: 0,
            db_row: 0,
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
            opened_here: false,
            links: Links::default(),
        }
    }
}

impl Linked for Flow {
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
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

    /// What this flow added to its totals rows since the last reset.
    pub fn contribution(&self) -> Contribution {
        Contribution {
            counters: self.total.since(&self.base),
            tcp: self.tcp.sub(&self.base_tcp),
            connections: (self.tcp.syn > self.base_tcp.syn) as u64,
        }
    }
}

/// The TCP events of one segment of flow `f` (flags, sequence space, window), with the
/// flow's own state brought up to date.
pub(super) fn tcp_events(f: &mut Flow, dir: Direction, t: &TcpFields, wire_len: u32, ts_us: i64) -> TcpEvents {
    let mut ev = TcpEvents::empty();
    let d = match dir {
        Direction::In => 0,
        Direction::Out => 1,
    };
    let (inbound, syn, fin, rst) = (d == 0, t.flags & TCP_SYN != 0, t.flags & TCP_FIN != 0, t.flags & TCP_RST != 0);
    let by_dir = |in_flag, out_flag| TcpEvents::by_dir(inbound, in_flag, out_flag);
    if syn && t.flags & TCP_ACK == 0 && inbound {
        ev |= TcpEvents::SYN;
    }
    if rst {
        ev |= by_dir(TcpEvents::RST_IN, TcpEvents::RST_OUT);
        if f.closed_us == 0 {
            // 0 means open (and decides list membership), whatever the clock says.
            f.closed_us = ts_us.max(1);
        }
        return ev;
    }
    // Sequence space: SYN and FIN take one number each, data its length.
    let payload = t.payload_len(wire_len);
    let used = payload + syn as u32 + fin as u32;
    if used > 0 {
        let (retrans, ooo) = f.seq[d].segment(t.seq, t.seq.wrapping_add(used));
        if retrans {
            ev |= by_dir(TcpEvents::RETRANS_IN, TcpEvents::RETRANS_OUT);
        }
        if ooo {
            ev |= by_dir(TcpEvents::OOO_IN, TcpEvents::OOO_OUT);
        }
    }
    // A side that has sent its FIN closes its receive window when the application lets
    // go of the socket: that zero is the end, not a slow reader.
    if t.window == 0 && !syn && !fin && !f.fin_seen[d] {
        ev |= by_dir(TcpEvents::ZERO_WINDOW_IN, TcpEvents::ZERO_WINDOW_OUT);
    }
    if fin && !f.fin_seen[d] {
        f.fin_seen[d] = true;
        if f.first_fin == 0 {
            f.first_fin = d as u8 + 1;
        }
        ev |= by_dir(TcpEvents::FIN_IN, TcpEvents::FIN_OUT);
        if f.fin_seen[0] && f.fin_seen[1] && f.closed_us == 0 {
            f.closed_us = ts_us.max(1);
        }
    }
    ev
}
