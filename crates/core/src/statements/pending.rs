//! A backend's charges not yet in the shared statement table. Charging the table at every
//! statement took a lock all backends share and about 1,000 instructions; a backend now
//! adds its charges to a few rows of its own (in shared memory, where only it writes,
//! `stmtshm.rs` says how readers copy them) and moves them into the table at most once a
//! `FLUSH_INTERVAL_US`, when a new key finds no place, and at exit. Readers add these
//! rows to the table's, so nothing lags (`merge`).

use super::attrib::Figures;
use super::conns::Socket;
use super::seqcell::{SeqCell, Words};
use super::table::{Row, StmtKey};
use std::collections::HashMap;

/// Keys one backend holds before it must move them into the table: a statement's two
/// charges (out to the previous statement, in to the new one) always fit.
pub const PENDING_KEYS: usize = 8;

/// How long charges may wait in a backend before they go to the table: the table's own
/// bookkeeping (eviction order, `statements` count) lags by at most this, the rows never.
pub const FLUSH_INTERVAL_US: i64 = 1_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEntry {
    pub key: StmtKey,
    pub figures: Figures,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
}

/// `Pending` as the words its shared copy holds (`Words`): 8 bytes per word.
pub const PENDING_WORDS: usize = 1 + 7 + 1 + PENDING_KEYS * ENTRY_WORDS;
const ENTRY_WORDS: usize = 3 + FIGURES_WORDS + 2;
const FIGURES_WORDS: usize = 9;
const SOCKET_WORDS: usize = 6;

/// A backend's pending charges as other processes read them: one per connection slot,
/// 976 bytes (docs/how-it-works.md gives the region's sizes).
pub type PendingCell = SeqCell<PENDING_WORDS>;
const _: () = assert!(std::mem::size_of::<PendingCell>() == 976);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending {
    /// The table's reset generation these charges belong to: older ones were reset away.
    generation: u32,
    count: u32,
    /// The backend's latest socket reading (`Conn::socket` until the next flush).
    socket: Option<Socket>,
    /// When the charges were last moved into the table (or the first was added).
    since_us: i64,
    entries: [PendingEntry; PENDING_KEYS],
    /// The parts changed since their words were last stored (`Words::store_changes`):
    /// bit 0 the header word, 1 the socket, 2 `since_us`, 3 + i entry i. Not in the words.
    changed: u16,
}

const HEADER: u16 = 1;
const SOCKET: u16 = 1 << 1;
const SINCE: u16 = 1 << 2;
const fn entry_bit(i: usize) -> u16 {
    1 << (3 + i)
}
const EVERYTHING: u16 = (1 << (3 + PENDING_KEYS)) - 1;

impl Pending {
    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn socket(&self) -> Option<Socket> {
        self.socket
    }

    pub fn since_us(&self) -> i64 {
        self.since_us
    }

    /// The backend's latest socket reading.
    pub fn set_socket(&mut self, socket: Option<Socket>) {
        if self.socket != socket {
            self.socket = socket;
            self.changed |= SOCKET;
        }
    }

    pub fn entries(&self) -> &[PendingEntry] {
        &self.entries[..(self.count as usize).min(PENDING_KEYS)]
    }

    /// Whether `keys` can be added without a flush.
    pub fn fits<'a>(&self, keys: impl IntoIterator<Item = &'a StmtKey>) -> bool {
        let mut new = 0;
        for k in keys {
            if !self.entries().iter().any(|e| e.key == *k) {
                new += 1;
            }
        }
        self.count as usize + new <= PENDING_KEYS
    }

    /// Adds a charge; false (nothing added) when its key is new and every place is taken.
    pub fn add(&mut self, key: StmtKey, f: &Figures, now_us: i64) -> bool {
        let n = self.count as usize;
        if let Some(i) = self.entries[..n].iter().position(|e| e.key == key) {
            let e = &mut self.entries[i];
            e.figures.add(f);
            e.last_seen_us = now_us;
            self.changed |= entry_bit(i);
            return true;
        }
        if n == PENDING_KEYS {
            return false;
        }
        if n == 0 {
            self.since_us = now_us;
            self.changed |= SINCE;
        }
        self.entries[n] = PendingEntry { key, figures: *f, first_seen_us: now_us, last_seen_us: now_us };
        self.count += 1;
        self.changed |= HEADER | entry_bit(n);
        true
    }

    /// Whether the charges are due to go to the table.
    pub fn due(&self, now_us: i64) -> bool {
        self.count > 0 && now_us.saturating_sub(self.since_us) >= FLUSH_INTERVAL_US
    }

    /// Empties the charges and the reading (moved to the table and the slot, or reset
    /// away) and takes the current reset generation.
    pub fn clear(&mut self, generation: u32) {
        *self = Pending { generation, changed: EVERYTHING, ..Pending::default() };
    }
}

fn figures_words(f: &Figures) -> [u64; FIGURES_WORDS] {
    [f.calls, f.bytes_in, f.bytes_out, f.segs_in, f.segs_out, f.retrans, f.rtt_sum_us, f.rtt_samples, f.rtt_max_us]
}

fn figures_from(w: &[u64]) -> Figures {
    Figures {
        calls: w[0],
        bytes_in: w[1],
        bytes_out: w[2],
        segs_in: w[3],
        segs_out: w[4],
        retrans: w[5],
        rtt_sum_us: w[6],
        rtt_samples: w[7],
        rtt_max_us: w[8],
    }
}

/// Field by field, so no padding byte is ever copied: [generation | count << 32], the
/// socket (present?, then its six counters), `since_us`, then each entry (key, figures,
/// first and last seen).
impl Words<PENDING_WORDS> for Pending {
    fn encode(&self) -> [u64; PENDING_WORDS] {
        let mut w = [0u64; PENDING_WORDS];
        self.store_words(EVERYTHING, |i, v| w[i] = v);
        w
    }

    fn store_changes(&mut self, store: impl FnMut(usize, u64)) {
        let changed = std::mem::take(&mut self.changed);
        self.store_words(changed, store);
    }

    fn decode(w: &[u64; PENDING_WORDS]) -> Pending {
        let socket = (w[1] != 0).then(|| Socket {
            bytes_in: w[2],
            bytes_out: w[3],
            segments_in: w[4],
            segments_out: w[5],
            retransmits: w[6],
            rtt_us: w[7],
        });
        Pending {
            generation: w[0] as u32,
            // A count past the places (words of no valid value) holds every place.
            count: ((w[0] >> 32) as u32).min(PENDING_KEYS as u32),
            socket,
            since_us: w[8] as i64,
            changed: 0,
            entries: std::array::from_fn(|i| {
                let at = 9 + i * ENTRY_WORDS;
                PendingEntry {
                    key: StmtKey::from_words([w[at], w[at + 1], w[at + 2]]),
                    figures: figures_from(&w[at + 3..at + 3 + FIGURES_WORDS]),
                    first_seen_us: w[at + 3 + FIGURES_WORDS] as i64,
                    last_seen_us: w[at + 4 + FIGURES_WORDS] as i64,
                }
            }),
        }
    }
}

impl Pending {
    /// Stores the words of the parts named in `parts` (bits as in `changed`): the header
    /// ([generation | count << 32]), the socket, `since_us`, the entries.
    fn store_words(&self, parts: u16, mut store: impl FnMut(usize, u64)) {
        if parts & HEADER != 0 {
            store(0, self.generation as u64 | (self.count as u64) << 32);
        }
        if parts & SOCKET != 0 {
            let words = match self.socket {
                Some(s) => [1, s.bytes_in, s.bytes_out, s.segments_in, s.segments_out, s.retransmits, s.rtt_us],
                None => [0; 1 + SOCKET_WORDS],
            };
            for (i, v) in words.into_iter().enumerate() {
                store(1 + i, v);
            }
        }
        if parts & SINCE != 0 {
            store(8, self.since_us as u64);
        }
        for (i, e) in self.entries.iter().enumerate() {
            if parts & entry_bit(i) != 0 {
                let at = 9 + i * ENTRY_WORDS;
                let (key, figures) = (e.key.to_words(), figures_words(&e.figures));
                let times = [e.first_seen_us as u64, e.last_seen_us as u64];
                for (j, v) in key.iter().chain(&figures).chain(&times).enumerate() {
                    store(at + j, *v);
                }
            }
        }
    }
}

/// Adds backends' pending charges to a copy of the table: to the row of the same key, or
/// as a row of its own (a key not yet in the table).
pub fn merge<'a>(rows: &mut Vec<Row>, pending: impl IntoIterator<Item = &'a PendingEntry>) {
    let mut at: HashMap<StmtKey, usize> = rows.iter().enumerate().filter_map(|(i, r)| r.key.map(|k| (k, i))).collect();
    for p in pending {
        match at.get(&p.key) {
            Some(&i) => {
                let r = &mut rows[i];
                r.figures.add(&p.figures);
                r.first_seen_us =
                    if r.first_seen_us == 0 { p.first_seen_us } else { r.first_seen_us.min(p.first_seen_us) };
                r.last_seen_us = r.last_seen_us.max(p.last_seen_us);
            }
            None => {
                at.insert(p.key, rows.len());
                rows.push(Row {
                    key: Some(p.key),
                    figures: p.figures,
                    first_seen_us: p.first_seen_us,
                    last_seen_us: p.last_seen_us,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statements::Kind;

    fn key(q: u64) -> StmtKey {
        StmtKey::new(Kind::Statement, 10, 5, q)
    }

    fn out(n: u64) -> Figures {
        Figures { calls: 1, bytes_out: n, ..Figures::default() }
    }

    #[test]
    fn charges_of_a_key_add_up_and_new_keys_take_places_until_full() {
        let mut p = Pending::default();
        assert!(p.add(key(1), &out(5), 100));
        assert!(p.add(key(1), &out(7), 200));
        assert_eq!(p.entries().len(), 1);
        assert_eq!(p.entries()[0].figures.bytes_out, 12);
        assert_eq!(p.entries()[0].figures.calls, 2);
        assert_eq!((p.entries()[0].first_seen_us, p.entries()[0].last_seen_us), (100, 200));
        for q in 2..=PENDING_KEYS as u64 {
            assert!(p.fits([&key(q)]));
            assert!(p.add(key(q), &out(1), 300));
        }
        assert!(p.fits([&key(1), &key(2)]), "keys already held always fit");
        assert!(!p.fits([&key(1), &key(99)]));
        assert!(!p.add(key(99), &out(1), 400));
        assert_eq!(p.entries().len(), PENDING_KEYS);
        assert!(p.add(key(3), &out(1), 400), "a held key still adds when full");
    }

    #[test]
    fn pending_charges_survive_their_words_and_zero_words_are_no_charges() {
        let mut p = Pending::default();
        assert_eq!(Pending::decode(&p.encode()).entries().len(), 0);
        p.clear(u32::MAX);
        for q in 1..=PENDING_KEYS as u64 {
            let f = Figures {
                calls: q,
                bytes_in: q << 40,
                bytes_out: u64::MAX - q,
                segs_in: 1,
                segs_out: 2,
                retrans: 3,
                rtt_sum_us: 4,
                rtt_samples: 5,
                rtt_max_us: 6,
            };
            p.add(StmtKey::new(Kind::Setup, u32::MAX, q as u32, 0), &f, -(q as i64));
            p.add(StmtKey::new(Kind::Statement, 1, u32::MAX, u64::MAX - q), &f, i64::MAX);
            if p.entries().len() == PENDING_KEYS {
                break;
            }
        }
        p.set_socket(Some(Socket {
            bytes_in: 1,
            bytes_out: u64::MAX,
            segments_in: 3,
            segments_out: 4,
            retransmits: 5,
            rtt_us: 6,
        }));
        let back = Pending::decode(&p.encode());
        assert_eq!((back.generation, back.socket, back.since_us), (p.generation, p.socket, p.since_us));
        assert_eq!(back.entries(), p.entries());
        assert_eq!(back.entries().len(), PENDING_KEYS);
        assert_eq!(Pending::decode(&[0; PENDING_WORDS]).encode(), [0; PENDING_WORDS]);
    }

    #[test]
    fn due_after_the_interval_from_the_first_charge_since_a_clear() {
        let mut p = Pending::default();
        assert!(!p.due(i64::MAX), "nothing held, nothing due");
        p.add(key(1), &out(1), 1_000);
        p.add(key(1), &out(1), 1_000 + FLUSH_INTERVAL_US - 1);
        assert!(!p.due(1_000 + FLUSH_INTERVAL_US - 1));
        assert!(p.due(1_000 + FLUSH_INTERVAL_US));
        p.clear(3);
        assert_eq!((p.generation, p.entries().len()), (3, 0));
        p.add(key(2), &out(1), 5_000_000);
        assert!(!p.due(5_000_000 + FLUSH_INTERVAL_US / 2));
    }

    #[test]
    fn merge_adds_to_rows_of_the_same_key_and_appends_new_keys() {
        let row = |k: Option<StmtKey>, n, first, last| Row {
            key: k,
            figures: out(n),
            first_seen_us: first,
            last_seen_us: last,
        };
        let mut rows = vec![row(Some(key(1)), 10, 50, 60), row(None, 3, 1, 2)];
        let mut a = Pending::default();
        a.add(key(1), &out(5), 40);
        a.add(key(2), &out(6), 70);
        let mut b = Pending::default();
        b.add(key(2), &out(1), 80);
        merge(&mut rows, a.entries().iter().chain(b.entries()));
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            Row {
                key: Some(key(1)),
                figures: Figures { calls: 2, bytes_out: 15, ..Figures::default() },
                first_seen_us: 40,
                last_seen_us: 60
            }
        );
        assert_eq!(rows[1], row(None, 3, 1, 2), "the overflow row has no key and takes nothing");
        assert_eq!(
            rows[2],
            Row {
                key: Some(key(2)),
                figures: Figures { calls: 2, bytes_out: 7, ..Figures::default() },
                first_seen_us: 70,
                last_seen_us: 80
            }
        );
    }

    #[test]
    fn a_writer_with_its_own_copy_leaves_the_cell_word_for_word_as_a_full_rewrite_does() {
        // Two cells, the same changes: one by update (read back, rewrite what differs),
        // the other by update_from (this writer's copy, only the parts that changed).
        let (full, mine_cell) = (PendingCell::default(), PendingCell::default());
        let mut mine = Pending::default();
        let mut rng = crate::capture::testframes::xorshift(23);
        for step in 0..20_000u64 {
            let r = rng();
            let change = |p: &mut Pending| match r % 8 {
                0 => p.clear(r >> 8 & 3),
                1 => p.set_socket(Some(Socket { bytes_in: step, bytes_out: r as u64, ..Socket::default() })),
                2 => p.set_socket(None),
                _ => {
                    p.add(key((r >> 8) as u64 % 12), &out(r as u64 % 1000), step as i64);
                }
            };
            full.update(change);
            mine_cell.update_from(&mut mine, change);
            assert_eq!(mine_cell.raw_words(), full.raw_words(), "step {step}");
        }
        assert_eq!(mine_cell.read::<Pending>().map(|p| p.encode()), Some(mine.encode()));
    }
}
