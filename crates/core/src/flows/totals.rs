//! Per-role and per-database totals: what every flow of a role (or database) added since
//! the last reset, kept up to date packet by packet so the views read a few hundred rows,
//! never the flow table. Row 0 holds connections with no known owner and, once every row
//! is taken, the names that did not fit; row 1 the connections whose backend said they
//! never began a session (refused, or failed to authenticate), under no name: what a
//! client claims before it logs in never takes a row. So the rows always add up to the
//! whole, and only sessions that began can use up the named rows.

use super::key::NAME_LEN;
use crate::counters::{Counters, TcpCounters};

/// Rows kept for roles and for databases (row 0 and row 1 included).
pub const TOTALS_ROWS: usize = 256;

/// The row of connections that never began a session (`OwnerStatus` refused or failed).
pub const UNAUTHENTICATED_ROW: u16 = 1;

/// The first row that holds a name.
const FIRST_NAMED: usize = 2;

/// One row of the per-role or per-database totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        Totals {
            in_use: false,
            name: [0; NAME_LEN],
            connections: 0,
            counters: Counters::default(),
            tcp: TcpCounters::default(),
        }
    }
}

/// What one flow added to its row since the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    pub counters: Counters,
    pub tcp: TcpCounters,
    /// 1 when the flow's opening SYN was seen since the reset: the tail of a flow pushed
    /// out of a full table, or one already open when capture began, adds traffic but no
    /// connection.
    pub connections: u64,
}

impl Totals {
    pub fn add(&mut self, c: &Contribution) {
        self.counters.merge(&c.counters);
        self.tcp.add(&c.tcp);
        self.connections += c.connections;
    }

    /// Adds another row's figures (a saved row loaded into this one).
    pub fn merge(&mut self, o: &Totals) {
        self.counters.merge(&o.counters);
        self.tcp.add(&o.tcp);
        self.connections += o.connections;
    }

    /// Takes back what `add` added (a flow moving to the row of its owner).
    pub fn remove(&mut self, c: &Contribution) {
        self.counters = self.counters.since(&c.counters);
        self.tcp = self.tcp.sub(&c.tcp);
        self.connections = self.connections.saturating_sub(c.connections);
    }

    /// Starts again from zero, keeping the name (flows remember their row by position).
    pub fn clear(&mut self) {
        *self = Totals { in_use: self.in_use, name: self.name, ..Totals::default() };
    }

    pub fn is_empty(&self) -> bool {
        self.connections == 0 && self.counters.packets() == 0
    }
}

/// The row of `name`, taking a free row for a new name; 0 for no name, or when every row
/// is taken. A scan of at most `TOTALS_ROWS` rows, done once per connection when its
/// owner becomes known, never per packet. Only for sessions that began: a name a client
/// merely claimed goes to `UNAUTHENTICATED_ROW` without this.
pub fn row_for(rows: &mut [Totals], name: &[u8; NAME_LEN]) -> u16 {
    if name[0] == 0 {
        return 0;
    }
    if let Some(p) = rows.iter().skip(FIRST_NAMED).position(|r| r.in_use && r.name == *name) {
        return (p + FIRST_NAMED) as u16;
    }
    match rows.iter().skip(FIRST_NAMED).position(|r| !r.in_use) {
        Some(p) => {
            rows[p + FIRST_NAMED] = Totals { in_use: true, name: *name, ..Totals::default() };
            (p + FIRST_NAMED) as u16
        }
        None => 0,
    }
}

/// The rows a view of roles or databases shows: every named row, and row 0 when it holds
/// anything (never row 1: see `unauthenticated`).
pub fn visible(rows: &[Totals]) -> Vec<Totals> {
    let named = rows.iter().skip(FIRST_NAMED).filter(|r| r.in_use);
    rows.iter().take(1).filter(|r| !r.is_empty()).chain(named).copied().collect()
}

/// What connections that never began a session moved (the same in the role and the
/// database rows).
pub fn unauthenticated(rows: &[Totals]) -> Totals {
    rows.get(UNAUTHENTICATED_ROW as usize).copied().unwrap_or_default()
}
