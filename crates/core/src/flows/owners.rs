//! The owner registry: each TCP backend's own record of its connection (PID, role,
//! database, how authentication went), written by the backend itself and kept a minute
//! after it ends, so flows captured late can still be attributed. Keyed by `OwnerKey`
//! through a hash index; records of ended backends sit in a list oldest first, so
//! expiring them or making room is O(1). No operation here scans the registry.

use super::index;
use super::key::{FlowKey, OwnerKey, NAME_LEN};
use super::list::{Linked, Links};
use super::FlowTable;
use crate::peer::BackendKind;

/// How long the record of an ended backend is kept for flows captured after it ended.
pub const ENDED_KEPT_US: i64 = 60_000_000;

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
    /// application_name from the startup packet (a later SET is not seen here).
    pub application: [u8; NAME_LEN],
    pub kind: BackendKind,
    pub started_us: i64,
    /// 0 while the backend lives.
    pub ended_us: i64,
    /// Place in the list of ended records, or in the free list: the table's own (its
    /// fields are private; `register_owner` sets them), public so that a record can be
    /// built with `..Owner::default()`.
    pub links: Links,
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
            application: [0; NAME_LEN],
            kind: BackendKind::Unknown,
            started_us: 0,
            ended_us: 0,
            links: Links::default(),
        }
    }
}

impl Linked for Owner {
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

impl Owner {
    /// Whether this record can be the owner of a flow. A flow that began with its SYN
    /// under our eyes belongs to a backend that registered after that SYN; the record of
    /// an earlier connection from the same client port is someone else's.
    pub fn fits(&self, flow_first_seen_us: i64, opened_here: bool) -> bool {
        !opened_here || self.started_us >= flow_first_seen_us
    }
}

impl FlowTable<'_> {
    fn owner_slot(&self, key: &OwnerKey) -> (usize, bool) {
        index::find(self.owner_index, key.hash(&self.header.hash_key), |p| self.owners[p].key == *key)
    }

    /// The newest record for a connection, if any.
    pub fn owner(&self, key: &OwnerKey) -> Option<&Owner> {
        match self.owner_slot(key) {
            (i, true) => Some(&self.owners[self.owner_index[i] as usize - 1]),
            _ => None,
        }
    }

    /// Forgets the record at `pos` and gives its place back.
    fn free_owner(&mut self, pos: usize) {
        let key = self.owners[pos].key;
        if let (i, true) = self.owner_slot(&key) {
            let owners = &*self.owners;
            let hk = self.header.hash_key;
            index::remove(self.owner_index, i, |p| owners[p].key.hash(&hk));
        }
        if self.owners[pos].ended_us != 0 {
            self.header.ended.remove(self.owners, pos);
        }
        self.owners[pos] = Owner::default();
        self.header.owner_free.push_back(self.owners, pos);
        self.header.owner_count -= 1;
    }

    /// A free place for a new record: a free one, one never used, or the place of the
    /// record of the backend that ended longest ago.
    fn owner_place(&mut self) -> Option<usize> {
        if let Some(p) = self.header.owner_free.pop_front(self.owners) {
            return Some(p);
        }
        if (self.header.owner_never_used as usize) < self.owners.len() {
            self.header.owner_never_used += 1;
            return Some(self.header.owner_never_used as usize - 1);
        }
        let oldest = self.header.ended.front()?;
        self.free_owner(oldest);
        self.header.owner_free.pop_front(self.owners)
    }

    /// Records a backend's connection (`server_addr`: the server's address on it) and
    /// gives it to the flows already captured for it, on each captured device. A new
    /// record for the same connection replaces the old one (a client port reused). With
    /// the registry full of live backends the record is lost and counted.
    pub fn register_owner(&mut self, owner: Owner, server_addr: [u8; 16]) {
        let pos = match self.owner_slot(&owner.key) {
            (i, true) => {
                let p = self.owner_index[i] as usize - 1;
                if self.owners[p].ended_us != 0 {
                    self.header.ended.remove(self.owners, p);
                }
                p
            }
            _ => match self.owner_place() {
                Some(p) => {
                    // The place may have come from an expired record: probe again.
                    let (i, _) = self.owner_slot(&owner.key);
                    self.owner_index[i] = p as u32 + 1;
                    self.header.owner_count += 1;
                    p
                }
                None => {
                    self.header.owner_overflow += 1;
                    return;
                }
            },
        };
        self.owners[pos] = Owner { in_use: true, links: Links::default(), ..owner };
        if owner.ended_us != 0 {
            self.header.ended.push_back(self.owners, pos);
        }
        let k = owner.key;
        for d in 0..self.header.device_count as usize {
            let key = FlowKey {
                client_addr: k.client_addr,
                server_addr,
                client_port: k.client_port,
                server_port: k.server_port,
                device: self.header.devices[d],
                ipv6: k.ipv6,
            };
            if let Some(f) = self.flow_pos(&key) {
                self.resolve(f);
            }
        }
    }

    /// Marks the backend `pid`'s record ended.
    pub fn end_owner(&mut self, key: &OwnerKey, pid: i32, now_us: i64) {
        if let (i, true) = self.owner_slot(key) {
            let p = self.owner_index[i] as usize - 1;
            let o = &mut self.owners[p];
            if o.pid == pid && o.ended_us == 0 {
                // 0 means "still running" (and decides list membership): a clock at the
                // epoch must not make an ended record look alive.
                o.ended_us = now_us.max(1);
                self.header.ended.push_back(self.owners, p);
            }
        }
    }

    /// Forgets records of backends that ended over `ENDED_KEPT_US` ago, at most `budget`
    /// of them; returns how many.
    pub(super) fn expire_owners(&mut self, now_us: i64, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            match self.header.ended.front() {
                Some(p) if now_us - self.owners[p].ended_us > ENDED_KEPT_US => self.free_owner(p),
                _ => break,
            }
            n += 1;
        }
        n
    }
}
