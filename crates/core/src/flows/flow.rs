//! One TCP connection as the capture sees it on one device.

use super::key::{FlowKey, NAME_LEN};
use super::list::{Linked, Links};
use super::owners::OwnerStatus;
use super::seq::SeqTrack;
use super::totals::Contribution;
use crate::counters::{Counters, TcpCounters};
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
