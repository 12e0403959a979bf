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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

    fn other(&self) -> StmtKey {
        StmtKey::new(Kind::Other, self.role, self.database, 0)
    }

    fn hash(&self) -> u64 {
        // Multiply-rotate, as the flow keys: a few instructions, keys are not secret.
        let mut h = 0u64;
        for w in [self.queryid, (self.role as u64) << 32 | self.database as u64, self.kind as u64] {
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
                    Entry { in_use: true, key, first_seen_us: now_us, last_seen_us: now_us, ..Entry::default() };
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
                            o.first_seen_us = now_us;
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
        let capacity = (self.header.capacity as usize).min(self.entries.len());
        if (self.header.count as usize) < capacity {
            // Places are only freed all at once (reset), so the used ones are a prefix.
            return Some(self.header.count as usize);
        }
        loop {
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
                    return Some(victim);
                }
                (i, false) => {
                    // The victim becomes its role's and database's "other" row, out of
                    // the eviction line; the next least recent makes the room.
                    self.entries[victim].key = other;
                    self.index[i] = victim as u32 + 1;
                }
            }
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
}
