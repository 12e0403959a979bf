//! The bounded statement table: one entry per (role, database, query id) and kind, found
//! through a hash index (`flows::index`), the least recently charged first in line for
//! eviction (`flows::list`). Every operation is O(1) whatever `max_statements` is.
//!
//! Eviction: a new entry that finds the table full takes the place of the entry charged
//! least recently, whose figures are folded into the "other statements" row of its role
//! and database. Those rows are never evicted; the first one a role and database need
//! is the evicted entry itself, re-keyed, which then frees the next least recent. Only
//! when every place holds an "other" row does a new statement go straight into its
//! role's and database's "other" row, or, if it has none, into the table-wide overflow
//! row. Figures are only ever moved, never dropped: the sum over all rows is every byte
//! charged since the last reset.

use super::attrib::Figures;
use crate::flows::index;
use crate::flows::list::{Linked, Links, List};

/// What a row stands for.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A top-level statement.
    Statement = 1,
    /// Everything a connection sends and receives before its first statement.
    Setup = 2,
    /// Statements evicted from the table, per role and database.
    Other = 3,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Statement => "statement",
            Kind::Setup => "setup",
            Kind::Other => "other",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StmtKey {
    /// PostgreSQL's query id (0 for the setup and "other" rows, and for statements that
    /// have none: failed before parse analysis, or compute_query_id = off).
    pub queryid: u64,
    pub role: u32,
    pub database: u32,
    /// A `Kind`; 0 only in an unused entry.
    kind: u8,
}

impl StmtKey {
    pub fn new(kind: Kind, role: u32, database: u32, queryid: u64) -> Self {
        let queryid = if kind == Kind::Statement { queryid } else { 0 };
        StmtKey { queryid, role, database, kind: kind as u8 }
    }

    pub fn kind(&self) -> Kind {
        match self.kind {
            2 => Kind::Setup,
            3 => Kind::Other,
            _ => Kind::Statement,
        }
    }

    /// The key as three words (`pending`'s shared copy) and back: every field whole.
    pub fn to_words(&self) -> [u64; 3] {
        [self.queryid, (self.role as u64) << 32 | self.database as u64, self.kind as u64]
    }

    pub fn from_words(w: [u64; 3]) -> StmtKey {
        StmtKey { queryid: w[0], role: (w[1] >> 32) as u32, database: w[1] as u32, kind: w[2] as u8 }
    }

    fn other(&self) -> StmtKey {
        StmtKey::new(Kind::Other, self.role, self.database, 0)
    }

    fn hash(&self) -> u64 {
        // Multiply-rotate, as the flow keys: a few instructions, keys are not secret.
        let mut h = 0u64;
        for w in self.to_words() {
            h = (h.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
        h ^ (h >> 29)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Entry {
    pub in_use: bool,
    pub key: StmtKey,
    links: Links,
    pub figures: Figures,
    /// Unix microseconds of the first and last charge.
    pub first_seen_us: i64,
    pub last_seen_us: i64,
}

/// docs/configuration.md (pg_netstat.max_statements) and the setting's description say
/// what an entry costs: these 128 bytes, and 8 to 16 of index.
const _: () = assert!(std::mem::size_of::<Entry>() == 128);

impl Linked for Entry {
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

/// Bookkeeping at the head of the table. All-zero bytes are an empty table but for the
/// capacity, set when the region is made.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    pub capacity: u32,
    pub count: u32,
    /// Statement and setup entries, least recently charged first ("other" rows are not in it).
    lru: List,
    /// Entries folded into an "other" row to make room.
    pub evictions: u64,
    /// Charges that found every place taken by "other" rows and no row of their own
    /// role and database: their figures are in `overflow`.
    pub overflow_charges: u64,
    /// The table-wide overflow row (role and database 0).
    pub overflow: Entry,
    pub stats_reset_us: i64,
}

/// The most entries a table can have: the largest `pg_netstat.max_statements` (the extension's gucs/).
/// A saved file holds at most this many rows and the overflow row.
pub const MOST_ENTRIES: usize = 1_000_000;

/// One row as a copy of the table holds it (and the saved file, crates/core/src/savefile/): the
/// key (`None`: the table-wide overflow row), the figures and when they were charged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub key: Option<StmtKey>,
    pub figures: Figures,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
}

/// The table's own counters (pg_netstat_statement_table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounters {
    pub evictions: u64,
    pub overflow_charges: u64,
    pub stats_reset_us: i64,
}

/// The rows and counters of a table (or of a copy of its header and entries, taken under
/// the lock and turned into rows after it): every entry in use, then the overflow row
/// when it holds anything.
pub fn snapshot(header: &Header, entries: &[Entry]) -> (Vec<Row>, TableCounters) {
    let row =
        |e: &Entry, key| Row { key, figures: e.figures, first_seen_us: e.first_seen_us, last_seen_us: e.last_seen_us };
    let mut rows: Vec<Row> = entries.iter().filter(|e| e.in_use).map(|e| row(e, Some(e.key))).collect();
    if !header.overflow.figures.is_zero() {
        rows.push(row(&header.overflow, None));
    }
    let counters = TableCounters {
        evictions: header.evictions,
        overflow_charges: header.overflow_charges,
        stats_reset_us: header.stats_reset_us,
    };
    (rows, counters)
}

/// The order in which `restore` should get saved rows (sort outside the lock): "other"
/// rows and the overflow row first, then the others least recently charged first, as
/// the eviction line had them. Any order loses nothing; this one makes a table smaller
/// than the saved one keep the most recently charged rows, as eviction would have.
pub fn restore_order(rows: &mut [Row]) {
    rows.sort_by_key(|r| (r.key.is_some_and(|k| k.kind() != Kind::Other), r.last_seen_us));
}

pub struct StatementTable<'a> {
    pub header: &'a mut Header,
    pub index: &'a mut [u32],
    pub entries: &'a mut [Entry],
}

impl StatementTable<'_> {
    fn find(&self, key: &StmtKey) -> (usize, bool) {
        let entries = &*self.entries;
        index::find(self.index, key.hash(), |p| entries[p].in_use && entries[p].key == *key)
    }

    fn unindex(&mut self, pos: usize) {
        if let (i, true) = self.find(&self.entries[pos].key) {
            let entries = &*self.entries;
            index::remove(self.index, i, |p| entries[p].key.hash());
        }
    }

    /// Adds `f` to the row of `key`, making it if needed.
    pub fn charge(&mut self, key: StmtKey, f: &Figures, now_us: i64) {
        self.charge_between(key, f, now_us, now_us);
    }

    /// `charge` for charges made between `first_us` and `now_us` (a backend's pending ones).
    pub fn charge_between(&mut self, key: StmtKey, f: &Figures, first_us: i64, now_us: i64) {
        if let (i, true) = self.find(&key) {
            let pos = self.index[i] as usize - 1;
            self.add_to(pos, f, now_us);
            if key.kind() != Kind::Other {
                // Most recently charged goes to the back of the eviction line.
                self.header.lru.remove(self.entries, pos);
                self.header.lru.push_back(self.entries, pos);
            }
            return;
        }
        match self.free_place() {
            Some(pos) => {
                self.entries[pos] =
                    Entry { in_use: true, key, first_seen_us: first_us, last_seen_us: now_us, ..Entry::default() };
                self.entries[pos].figures = *f;
                let (i, _) = self.find(&key);
                self.index[i] = pos as u32 + 1;
                self.header.count += 1;
                if key.kind() != Kind::Other {
                    self.header.lru.push_back(self.entries, pos);
                }
            }
            None => {
                // Every place holds an "other" row.
                self.header.overflow_charges += 1;
                let pos = match self.find(&key.other()) {
                    (i, true) => self.index[i] as usize - 1,
                    _ => {
                        let o = &mut self.header.overflow;
                        if o.first_seen_us == 0 {
                            o.first_seen_us = first_us;
                        }
                        o.last_seen_us = now_us;
                        o.figures.add(f);
                        return;
                    }
                };
                self.add_to(pos, f, now_us);
            }
        }
    }

    fn add_to(&mut self, pos: usize, f: &Figures, now_us: i64) {
        let e = &mut self.entries[pos];
        e.figures.add(f);
        e.last_seen_us = now_us;
    }

    /// A place for a new entry: never used yet, or freed by evicting the least recently
    /// charged entry into its "other" row. `None` when only "other" rows are left.
    fn free_place(&mut self) -> Option<usize> {
        if (self.header.count as usize) < self.capacity() {
            // Places are only freed all at once (reset), so the used ones are a prefix.
            return Some(self.header.count as usize);
        }
        loop {
            if let Some(pos) = self.evict_one()? {
                return Some(pos);
            }
        }
    }

    fn capacity(&self) -> usize {
        (self.header.capacity as usize).min(self.entries.len())
    }

    /// Evicts the least recently charged entry: `Some(Some(pos))` when its figures went
    /// into its role's and database's "other" row and `pos` is free (and must be filled
    /// at once: used places are a prefix); `Some(None)` when it became that "other" row
    /// itself, which frees nothing; `None` when only "other" rows are left.
    fn evict_one(&mut self) -> Option<Option<usize>> {
        let victim = self.header.lru.pop_front(self.entries)?;
        self.header.evictions += 1;
        let other = self.entries[victim].key.other();
        self.unindex(victim);
        match self.find(&other) {
            (i, true) => {
                let pos = self.index[i] as usize - 1;
                let v = self.entries[victim];
                let o = &mut self.entries[pos];
                o.figures.add(&v.figures);
                o.first_seen_us = o.first_seen_us.min(v.first_seen_us);
                o.last_seen_us = o.last_seen_us.max(v.last_seen_us);
                self.entries[victim] = Entry::default();
                self.header.count -= 1;
                Some(Some(victim))
            }
            (i, false) => {
                // The victim becomes its role's and database's "other" row, out of
                // the eviction line; the next least recent makes the room.
                self.entries[victim].key = other;
                self.index[i] = victim as u32 + 1;
                Some(None)
            }
        }
    }

    /// Puts saved rows (in `restore_order`) and counters back, adding them to whatever
    /// was charged since the server started (a row of the same key takes the saved
    /// figures too). A row that finds the table full makes room as a new statement does
    /// (the least recently charged entry is folded into its "other" row); one that finds
    /// only "other" rows goes into its role's and database's "other" row, or the
    /// overflow row. So a lowered `pg_netstat.max_statements` keeps every byte. Returns
    /// how many rows were folded to make room (counted in `evictions` too).
    pub fn restore(&mut self, rows: &[Row], counters: &TableCounters) -> u64 {
        let evictions_before = self.header.evictions;
        for r in rows {
            match r.key {
                Some(key) => self.restore_row(key, r),
                None => merge(&mut self.header.overflow, r),
            }
        }
        let folded = self.header.evictions - evictions_before;
        self.header.evictions += counters.evictions;
        self.header.overflow_charges += counters.overflow_charges;
        if counters.stats_reset_us != 0 && self.header.stats_reset_us == 0 {
            self.header.stats_reset_us = counters.stats_reset_us;
        }
        folded
    }

    fn restore_row(&mut self, key: StmtKey, r: &Row) {
        loop {
            if let (i, true) = self.find(&key) {
                let pos = self.index[i] as usize - 1;
                merge(&mut self.entries[pos], r);
                return;
            }
            let pos = if (self.header.count as usize) < self.capacity() {
                self.header.count as usize
            } else {
                match self.evict_one() {
                    Some(Some(pos)) => pos,
                    // The victim became an "other" row (perhaps this one's): look again.
                    Some(None) => continue,
                    None => {
                        // Only "other" rows: into this row's own, or the overflow row.
                        self.header.evictions += 1;
                        match self.find(&key.other()) {
                            (i, true) => {
                                let pos = self.index[i] as usize - 1;
                                merge(&mut self.entries[pos], r);
                            }
                            _ => merge(&mut self.header.overflow, r),
                        }
                        return;
                    }
                }
            };
            self.entries[pos] = Entry {
                in_use: true,
                key,
                figures: r.figures,
                first_seen_us: r.first_seen_us,
                last_seen_us: r.last_seen_us,
                ..Entry::default()
            };
            let (i, _) = self.find(&key);
            self.index[i] = pos as u32 + 1;
            self.header.count += 1;
            if key.kind() != Kind::Other {
                self.header.lru.push_back(self.entries, pos);
            }
            return;
        }
    }

    /// Forgets every row: the figures start again from zero.
    pub fn reset(&mut self, now_us: i64) {
        let capacity = self.header.capacity;
        self.index.fill(0);
        self.entries.fill(Entry::default());
        *self.header = Header { capacity, stats_reset_us: now_us, ..Header::default() };
    }
}

/// Adds a saved row's figures and times to an entry (times of 0 are unknown).
fn merge(e: &mut Entry, r: &Row) {
    e.figures.add(&r.figures);
    let known = |t: i64| (t != 0).then_some(t);
    e.first_seen_us = [known(e.first_seen_us), known(r.first_seen_us)].into_iter().flatten().min().unwrap_or(0);
    e.last_seen_us = e.last_seen_us.max(r.last_seen_us);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owned {
        header: Header,
        index: Vec<u32>,
        entries: Vec<Entry>,
    }

    impl Owned {
        fn new(capacity: usize) -> Self {
            Owned {
                header: Header { capacity: capacity as u32, ..Header::default() },
                index: vec![0; index::len_for(capacity)],
                entries: vec![Entry::default(); capacity],
            }
        }
        fn t(&mut self) -> StatementTable<'_> {
            StatementTable { header: &mut self.header, index: &mut self.index, entries: &mut self.entries }
        }
        fn rows(&self) -> Vec<Entry> {
            let mut v: Vec<Entry> = self.entries.iter().filter(|e| e.in_use).copied().collect();
            if !self.header.overflow.figures.is_zero() {
                v.push(self.header.overflow);
            }
            v
        }
        fn get(&self, key: StmtKey) -> Option<Figures> {
            self.entries.iter().find(|e| e.in_use && e.key == key).map(|e| e.figures)
        }
        fn total_out(&self) -> u64 {
            self.rows().iter().map(|e| e.figures.bytes_out).sum()
        }
    }

    fn out(n: u64) -> Figures {
        Figures { calls: 1, bytes_out: n, ..Figures::default() }
    }

    fn stmt(role: u32, q: u64) -> StmtKey {
        StmtKey::new(Kind::Statement, role, 5, q)
    }

    #[test]
    fn charges_add_up_per_key() {
        let mut o = Owned::new(8);
        o.t().charge(stmt(10, 1), &out(100), 1);
        o.t().charge(stmt(10, 1), &out(50), 2);
        o.t().charge(stmt(11, 1), &out(7), 3);
        o.t().charge(StmtKey::new(Kind::Setup, 10, 5, 99), &out(3), 3);
        assert_eq!(o.get(stmt(10, 1)).unwrap().bytes_out, 150);
        assert_eq!(o.get(stmt(10, 1)).unwrap().calls, 2);
        assert_eq!(o.get(stmt(11, 1)).unwrap().bytes_out, 7);
        assert_eq!(o.get(StmtKey::new(Kind::Setup, 10, 5, 0)).unwrap().bytes_out, 3);
        assert_eq!(o.header.count, 3);
    }

    #[test]
    fn eviction_folds_the_least_recent_into_its_roles_other_row() {
        let mut o = Owned::new(3);
        o.t().charge(stmt(10, 1), &out(1), 1);
        o.t().charge(stmt(10, 2), &out(2), 2);
        o.t().charge(stmt(10, 3), &out(4), 3);
        o.t().charge(stmt(10, 1), &out(8), 4); // 1 is now the most recent
        o.t().charge(stmt(10, 4), &out(16), 5);
        // 2 became the "other" row; 3 was folded into it to make room for 4.
        assert_eq!(o.get(stmt(10, 2)), None);
        assert_eq!(o.get(stmt(10, 3)), None);
        assert_eq!(o.get(StmtKey::new(Kind::Other, 10, 5, 0)).unwrap().bytes_out, 6);
        assert_eq!(o.get(stmt(10, 1)).unwrap().bytes_out, 9);
        assert_eq!(o.get(stmt(10, 4)).unwrap().bytes_out, 16);
        assert_eq!(o.header.evictions, 2);
        assert_eq!(o.total_out(), 31);
    }

    #[test]
    fn a_table_of_other_rows_overflows_without_losing_bytes() {
        let mut o = Owned::new(2);
        o.t().charge(stmt(1, 1), &out(1), 1);
        o.t().charge(stmt(2, 1), &out(2), 1);
        o.t().charge(stmt(3, 1), &out(4), 1); // both become "other" rows of roles 1 and 2
        assert_eq!(o.rows().iter().filter(|e| e.key.kind() == Kind::Other).count(), 2);
        assert_eq!(o.header.overflow.figures.bytes_out, 4);
        o.t().charge(stmt(1, 9), &out(8), 1); // role 1 has an "other" row: it goes there
        assert_eq!(o.get(StmtKey::new(Kind::Other, 1, 5, 0)).unwrap().bytes_out, 9);
        assert_eq!(o.header.overflow_charges, 2);
        assert_eq!(o.total_out(), 15);
    }

    #[test]
    fn random_charges_never_lose_a_byte_and_stay_findable() {
        let mut o = Owned::new(16);
        let mut rng = crate::capture::testframes::xorshift(5);
        let mut sum = 0;
        for step in 0..20_000u64 {
            let key = match rng() % 10 {
                0 => StmtKey::new(Kind::Setup, rng() % 4, 1, 0),
                _ => StmtKey::new(Kind::Statement, rng() % 4, 1 + rng() % 2, (rng() % 40) as u64),
            };
            let n = (rng() % 1000) as u64;
            sum += n;
            o.t().charge(key, &out(n), step as i64);
            assert_eq!(o.total_out(), sum, "step {step}");
            // Every row in use is findable through the index, and only once.
            let keys: Vec<StmtKey> = o.entries.iter().filter(|e| e.in_use).map(|e| e.key).collect();
            for k in keys {
                assert!(o.t().find(&k).1);
                let e = o.entries.iter().find(|x| x.in_use && x.key == k).unwrap();
                assert_eq!(o.entries.iter().filter(|x| x.in_use && x.key == e.key).count(), 1);
            }
            assert!(o.header.count as usize <= 16);
        }
        o.t().reset(7);
        assert_eq!((o.rows().len(), o.header.count, o.header.stats_reset_us), (0, 0, 7));
        o.t().charge(stmt(1, 1), &out(3), 8);
        assert_eq!(o.total_out(), 3);
    }

    fn snapshot_of(o: &Owned) -> (Vec<Row>, TableCounters) {
        snapshot(&o.header, &o.entries)
    }

    /// Rows in a fixed order, to compare tables whose places differ.
    fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
        rows.sort_by_key(|r| r.key.map(|k| (k.kind, k.role, k.database, k.queryid)));
        rows
    }

    fn restored(capacity: usize, rows: &[Row], c: &TableCounters) -> (Owned, u64) {
        let mut rows = rows.to_vec();
        restore_order(&mut rows);
        let mut o = Owned::new(capacity);
        let folded = o.t().restore(&rows, c);
        (o, folded)
    }

    fn assert_consistent(o: &mut Owned) {
        let keys: Vec<StmtKey> = o.entries.iter().filter(|e| e.in_use).map(|e| e.key).collect();
        assert_eq!(keys.len(), o.header.count as usize);
        assert!(o.entries[..keys.len()].iter().all(|e| e.in_use), "used places are a prefix");
        for k in &keys {
            assert!(o.t().find(k).1);
            assert_eq!(keys.iter().filter(|x| *x == k).count(), 1);
        }
        let in_line = o.entries.iter().filter(|e| e.in_use && e.key.kind() != Kind::Other).count();
        assert_eq!(o.header.lru.len as usize, in_line);
    }

    #[test]
    fn a_snapshot_restored_into_a_table_of_the_same_size_is_the_same_table() {
        let mut o = Owned::new(4);
        for (i, key) in [stmt(1, 1), stmt(1, 2), StmtKey::new(Kind::Setup, 1, 5, 0), stmt(2, 1), stmt(1, 3), stmt(1, 1)]
            .into_iter()
            .enumerate()
        {
            let f =
                Figures { rtt_sum_us: 300, rtt_samples: 2, rtt_max_us: 250, segs_in: 3, retrans: 1, ..out(10 << i) };
            o.t().charge(key, &f, 100 + i as i64);
        }
        o.header.overflow = Entry { figures: out(77), first_seen_us: 50, last_seen_us: 60, ..Entry::default() };
        o.header.stats_reset_us = 42;
        let (rows, c) = snapshot_of(&o);
        assert_eq!(rows.len(), 5); // 4 entries (one of them "other") and the overflow row
        assert_eq!((c.evictions, c.stats_reset_us), (3, 42));
        let (mut r, folded) = restored(4, &rows, &c);
        assert_eq!(folded, 0);
        assert_eq!(sorted(snapshot_of(&r).0), sorted(rows));
        assert_eq!(snapshot_of(&r).1, c);
        assert_consistent(&mut r);
        // The eviction line is as it was: the next new statement evicts the same entry in both.
        o.t().charge(stmt(3, 9), &out(1), 200);
        r.t().charge(stmt(3, 9), &out(1), 200);
        assert_eq!(sorted(snapshot_of(&r).0), sorted(snapshot_of(&o).0));
    }

    /// A lowered max_statements: the saved rows that no longer fit are folded into "other"
    /// rows exactly as eviction would have folded them in a table of the new size.
    #[test]
    fn a_smaller_table_folds_the_surplus_as_eviction_would() {
        // Each key charged once (so the table's eviction line is the order of last_seen).
        let charges: Vec<(StmtKey, Figures)> = (0..30u64)
            .map(|i| match i % 7 {
                0 => (StmtKey::new(Kind::Setup, 1 + i as u32 % 2, 5 + i as u32, 0), out(i + 1)),
                _ => (stmt(1 + i as u32 % 2, i), Figures { segs_out: i, ..out(1000 + i) }),
            })
            .collect();
        let mut big = Owned::new(64);
        let mut small = Owned::new(10);
        for (i, (key, f)) in charges.iter().enumerate() {
            big.t().charge(*key, f, 1000 + i as i64);
            small.t().charge(*key, f, 1000 + i as i64);
        }
        assert_eq!(big.header.evictions, 0);
        let (rows, c) = snapshot_of(&big);
        let (mut r, folded) = restored(10, &rows, &c);
        assert_eq!(sorted(snapshot_of(&r).0), sorted(snapshot_of(&small).0));
        assert_eq!(folded, small.header.evictions);
        assert_eq!(r.header.evictions, small.header.evictions);
        assert_eq!(r.total_out(), big.total_out());
        assert_eq!(r.header.count, 10);
        assert_consistent(&mut r);
    }

    #[test]
    fn saved_rows_are_added_to_what_was_charged_since_the_start() {
        let mut o = Owned::new(8);
        o.t().charge(stmt(1, 1), &out(5), 2_000);
        o.t().charge(stmt(1, 2), &out(6), 2_001);
        o.header.stats_reset_us = 0;
        let saved = [
            Row { key: Some(stmt(1, 1)), figures: out(100), first_seen_us: 900, last_seen_us: 950 },
            Row {
                key: Some(StmtKey::new(Kind::Other, 1, 5, 0)),
                figures: out(30),
                first_seen_us: 10,
                last_seen_us: 20,
            },
            Row { key: None, figures: out(4), first_seen_us: 0, last_seen_us: 0 },
        ];
        let c = TableCounters { evictions: 3, overflow_charges: 2, stats_reset_us: 7 };
        let mut rows = saved.to_vec();
        restore_order(&mut rows);
        assert_eq!(o.t().restore(&rows, &c), 0);
        let e = o.entries.iter().find(|e| e.in_use && e.key == stmt(1, 1)).unwrap();
        assert_eq!((e.figures.bytes_out, e.figures.calls, e.first_seen_us, e.last_seen_us), (105, 2, 900, 2_000));
        assert_eq!(o.get(StmtKey::new(Kind::Other, 1, 5, 0)).unwrap().bytes_out, 30);
        assert_eq!(o.header.overflow.figures.bytes_out, 4);
        assert_eq!((o.header.evictions, o.header.overflow_charges, o.header.stats_reset_us), (3, 2, 7));
        assert_eq!(o.total_out(), 145);
        assert_consistent(&mut o);
    }

    #[test]
    fn more_other_rows_than_places_go_to_the_overflow_row_and_no_byte_is_lost() {
        let mut rows: Vec<Row> = (0..20u32)
            .map(|role| Row {
                key: Some(StmtKey::new(Kind::Other, role, 5, 0)),
                figures: out(role as u64 + 1),
                first_seen_us: 1,
                last_seen_us: 2,
            })
            .collect();
        rows.push(Row { key: Some(stmt(3, 1)), figures: out(1000), first_seen_us: 3, last_seen_us: 4 });
        rows.push(Row { key: Some(stmt(15, 1)), figures: out(2000), first_seen_us: 3, last_seen_us: 5 });
        let (mut r, folded) = restored(10, &rows, &TableCounters::default());
        assert_eq!(folded, 12);
        assert_eq!(r.header.count, 10);
        // Role 3 has an "other" row in the table: its statement went there; role 15's
        // went to the overflow row with the other rows that found no place.
        assert_eq!(r.get(StmtKey::new(Kind::Other, 3, 5, 0)).unwrap().bytes_out, 1004);
        assert_eq!(r.header.overflow.figures.bytes_out, (11..=20).sum::<u64>() + 2000);
        assert_eq!(r.total_out(), (1..=20).sum::<u64>() + 3000);
        assert_consistent(&mut r);
    }

    #[test]
    fn random_tables_restored_into_any_size_keep_every_byte() {
        let mut rng = crate::capture::testframes::xorshift(11);
        for round in 0..40 {
            let mut o = Owned::new(8 + (rng() % 60) as usize);
            for step in 0..(rng() % 400) as i64 {
                let key = match rng() % 8 {
                    0 => StmtKey::new(Kind::Setup, rng() % 5, 1, 0),
                    _ => StmtKey::new(Kind::Statement, rng() % 5, 1 + rng() % 2, (rng() % 50) as u64),
                };
                o.t().charge(key, &out((rng() % 1000) as u64), step);
            }
            let (rows, c) = snapshot_of(&o);
            let capacity = 1 + (rng() % 70) as usize;
            let (mut r, _) = restored(capacity, &rows, &c);
            assert_eq!(r.total_out(), o.total_out(), "round {round}");
            let calls = |x: &Owned| x.rows().iter().map(|e| e.figures.calls).sum::<u64>();
            assert_eq!(calls(&r), calls(&o), "round {round}");
            assert!(r.header.count as usize <= capacity);
            assert_consistent(&mut r);
        }
    }
}
