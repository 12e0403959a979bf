//! A value one writer publishes and any number of readers copy, without a lock and
//! without a shared access that is not atomic: the value as `W` atomic words behind a
//! sequence counter, odd while the writer changes them. A reader keeps its copy only if
//! the counter was even and unchanged across it, so it never takes a value half written.
//! (A byte copy that races with the writer, as a `read_volatile` seqlock does, is a data
//! race in Rust's memory model even when the copy is thrown away.)
//!
//! The ordering is the one Boehm gives for seqlocks in the C++ memory model ("Can
//! Seqlocks Get Along With Programming Language Memory Models?", 2012): the writer's odd
//! store, then a release fence, before its first word; the reader's words, then an
//! acquire fence, before it loads the counter again. A reader that saw any word of a
//! write therefore sees the counter that write made odd.
//!
//! Lives in shared memory: `#[repr(C)]`, and all-zero bytes are a valid cell holding the
//! value whose words are all zero.

use std::sync::atomic::{fence, AtomicU64, Ordering};

/// A value as `u64` words and back. `decode(encode(v)) == v`; `decode` takes any words
/// (a zeroed cell, a newer or older encoding) and gives some value.
pub trait Words<const W: usize>: Sized {
    fn encode(&self) -> [u64; W];
    fn decode(words: &[u64; W]) -> Self;
    /// Stores (`store(i, word)`) at least every word changed since the last call, or
    /// since the value was decoded, and forgets those changes. This one stores them all;
    /// a value that tracks its own changes stores fewer (`SeqCell::update_from` writes
    /// only these).
    fn store_changes(&mut self, mut store: impl FnMut(usize, u64)) {
        for (i, w) in self.encode().into_iter().enumerate() {
            store(i, w);
        }
    }
}

#[repr(C)]
pub struct SeqCell<const W: usize> {
    changes: AtomicU64,
    words: [AtomicU64; W],
}

/// Attempts a reader makes before it gives up on a writer that keeps writing (or died
/// while writing, leaving the counter odd): it never waits on the writer.
const READ_ATTEMPTS: usize = 1000;

impl<const W: usize> SeqCell<W> {
    /// Changes the value by `f`. One writer at a time: two at once could leave readers a
    /// mix of both writes (never undefined behaviour: every access is atomic). The
    /// writer reads its own value without retries, since nobody else writes it.
    pub fn update<T: Words<W>, R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let old: [u64; W] = std::array::from_fn(|i| self.words[i].load(Ordering::Relaxed));
        let mut value = T::decode(&old);
        let r = f(&mut value);
        let new = value.encode();
        let c = self.changes.load(Ordering::Relaxed);
        self.changes.store(c.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, (o, n)) in old.iter().zip(new.iter()).enumerate() {
            if o != n {
                self.words[i].store(*n, Ordering::Relaxed);
            }
        }
        self.changes.store(c.wrapping_add(2), Ordering::Release);
        r
    }

    /// Changes the value by `f`, for the one writer that keeps its own copy of it:
    /// `mine` must be what the cell holds but for the changes it has not stored yet (what
    /// this writer last wrote, or read). Nothing is read back from the cell, and only the
    /// words `store_changes` names are written: a statement's charge changes a few of a
    /// backend's 121 words. If `f` panics, nothing is written and `mine` may hold changes
    /// the cell does not: the writer must then drop its copy and read the cell again.
    pub fn update_from<T: Words<W>, R>(&self, mine: &mut T, f: impl FnOnce(&mut T) -> R) -> R {
        let r = f(mine);
        let c = self.changes.load(Ordering::Relaxed);
        self.changes.store(c.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        mine.store_changes(|i, w| self.words[i].store(w, Ordering::Relaxed));
        self.changes.store(c.wrapping_add(2), Ordering::Release);
        r
    }

    /// The words as they are (tests compare cells word for word).
    #[cfg(test)]
    pub fn raw_words(&self) -> [u64; W] {
        std::array::from_fn(|i| self.words[i].load(Ordering::Relaxed))
    }

    /// A copy of the value, or `None` when the writer kept writing through every attempt.
    pub fn read<T: Words<W>>(&self) -> Option<T> {
        for attempt in 0..READ_ATTEMPTS {
            let before = self.changes.load(Ordering::Acquire);
            if before & 1 == 0 {
                let words: [u64; W] = std::array::from_fn(|i| self.words[i].load(Ordering::Relaxed));
                fence(Ordering::Acquire);
                if self.changes.load(Ordering::Relaxed) == before {
                    return Some(T::decode(&words));
                }
            }
            if attempt < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        None
    }
}

impl<const W: usize> Default for SeqCell<W> {
    fn default() -> Self {
        SeqCell { changes: AtomicU64::new(0), words: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    /// Every word a function of one number and its place: a torn copy has words of two.
    #[derive(Debug, PartialEq)]
    struct Stamp([u64; 32]);

    impl Stamp {
        fn of(n: u64) -> Stamp {
            Stamp(std::array::from_fn(|i| n.wrapping_mul(i as u64 + 1) ^ (i as u64) << 56))
        }
        fn whole(&self) -> bool {
            *self == Stamp::of(self.0[0])
        }
    }

    impl Words<32> for Stamp {
        fn encode(&self) -> [u64; 32] {
            self.0
        }
        fn decode(w: &[u64; 32]) -> Stamp {
            Stamp(*w)
        }
    }

    #[test]
    fn a_new_cell_holds_the_value_of_zero_words() {
        let c = SeqCell::<32>::default();
        assert_eq!(c.read::<Stamp>(), Some(Stamp([0; 32])));
        c.update(|s: &mut Stamp| *s = Stamp::of(7));
        assert_eq!(c.read::<Stamp>(), Some(Stamp::of(7)));
    }

    #[test]
    fn update_sees_the_value_it_changes() {
        let c = SeqCell::<32>::default();
        c.update(|s: &mut Stamp| *s = Stamp::of(3));
        let before = c.update(|s: &mut Stamp| {
            let b = s.0[0];
            *s = Stamp::of(b + 1);
            b
        });
        assert_eq!(before, 3);
        assert_eq!(c.read::<Stamp>(), Some(Stamp::of(4)));
    }

    #[test]
    fn readers_never_take_a_torn_value_from_a_writer_writing_as_hard_as_it_can() {
        let cell = SeqCell::<32>::default();
        // A whole value from the start: the zero words are no Stamp.
        cell.update(|v: &mut Stamp| *v = Stamp::of(0));
        let stop = AtomicBool::new(false);
        let (mut taken, mut refused) = (0u64, 0u64);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    cell.update(|v: &mut Stamp| *v = Stamp::of(n));
                    n += 1;
                }
            });
            let readers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let (mut ok, mut none, mut last) = (0u64, 0u64, 0u64);
                        let end = Instant::now() + Duration::from_millis(1500);
                        while Instant::now() < end {
                            match cell.read::<Stamp>() {
                                Some(v) => {
                                    assert!(v.whole(), "a torn value was taken: {v:?}");
                                    assert!(v.0[0] >= last, "a value older than one already read");
                                    last = v.0[0];
                                    ok += 1;
                                }
                                None => none += 1,
                            }
                        }
                        (ok, none)
                    })
                })
                .collect();
            let results: Vec<_> = readers.into_iter().map(|r| r.join()).collect();
            // The writer stops before a reader's failure is raised, or the scope would
            // wait for it forever.
            stop.store(true, Ordering::Relaxed);
            for r in results {
                let (ok, none) = r.unwrap_or_else(|e| std::panic::resume_unwind(e));
                taken += ok;
                refused += none;
            }
        });
        assert!(taken > 1000, "too few reads to mean anything: {taken} taken, {refused} refused");
    }
}
