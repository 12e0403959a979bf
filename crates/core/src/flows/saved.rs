//! What the saved file takes from the table and gives back after a restart: role,
//! database and egress totals and the table's counters (never the flows themselves).

use super::*;

impl FlowTable<'_> {
    /// Adds role and database totals and the table's counters saved before a restart
    /// (see `persist`): each saved row goes to the row of its name (the two unnamed rows,
    /// 0 and `UNAUTHENTICATED_ROW`, to themselves), taken as a new name would be, so rows
    /// that filled up and emptied before the restart are not carried over, and anything
    /// counted before the load is kept.
    pub fn restore_totals(
        &mut self,
        roles: &[(u16, Totals)],
        databases: &[(u16, Totals)],
        counters: [u64; 3],
        stats_reset_us: i64,
    ) {
        for (rows, saved) in [(&mut *self.roles, roles), (&mut *self.databases, databases)] {
            for (pos, t) in saved {
                let at = match (t.name[0], *pos) {
                    (0, totals::UNAUTHENTICATED_ROW) => totals::UNAUTHENTICATED_ROW,
                    (0, _) => 0,
                    _ => totals::row_for(rows, &t.name),
                };
                rows[at as usize].merge(t);
            }
        }
        self.header.evictions += counters[0];
        self.header.folded += counters[1];
        self.header.owner_overflow += counters[2];
        if stats_reset_us != 0 {
            self.header.stats_reset_us = stats_reset_us;
        }
    }
}

impl FlowTable<'_> {
    /// Adds the egress rows saved before a restart, each to its own row.
    pub fn restore_egress(&mut self, rows: &[(u8, Totals)]) {
        for (row, t) in rows {
            if let Some(r) = self.header.egress.get_mut(*row as usize) {
                r.merge(t);
            }
        }
    }
}

impl FlowView<'_> {
    /// The egress rows that hold anything, by position, for the saved file.
    pub fn saved_egress(&self) -> Vec<(u8, Totals)> {
        let rows = self.header.egress.iter().enumerate().filter(|(_, r)| !r.is_empty());
        rows.map(|(i, r)| (i as u8, *r)).collect()
    }

    /// The role or database rows worth saving, with their positions: those that hold
    /// anything (a name whose figures are all zero is not carried over a restart, so the
    /// rows never fill up for good).
    pub fn saved_rows(&self, by_role: bool) -> Vec<(u16, Totals)> {
        let rows = if by_role { self.roles } else { self.databases };
        rows.iter().enumerate().filter(|(_, r)| !r.is_empty()).map(|(i, r)| (i as u16, *r)).collect()
    }
}
