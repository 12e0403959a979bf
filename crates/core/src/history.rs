//! The interval history of one device, free of PostgreSQL: a ring of closed intervals
//! over storage the caller owns (a slice of shared memory sized by
//! `pg_netstat.history`), oldest first, the oldest overwritten once it is full.

use crate::counters::{Counters, TcpCounters};
use crate::stats::Closed;

/// Most intervals `pg_netstat.history` may keep per device: a day of 1-second intervals.
pub const MAX_HISTORY: usize = 86_400;

/// One closed interval as the views show it.
#[repr(C)]
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Interval start, Unix seconds.
    pub start: i64,
    pub secs: u32,
    pub counters: Counters,
    /// Packets the kernel dropped on this device (ring full), charged to the interval
    /// in which the worker learned of them.
    pub kernel_drops: u64,
    pub late: u64,
    /// When the interval was published, Unix microseconds.
    pub created_at_us: i64,
    pub tcp: TcpCounters,
}

/// docs/configuration.md, how-it-works.md and pg_netstat.history's description say 160
/// bytes per interval kept.
const _: () = assert!(std::mem::size_of::<Slot>() == 160);

impl Slot {
    pub fn from_closed(closed: &Closed, created_at_us: i64) -> Slot {
        Slot {
            start: closed.start,
            secs: closed.secs,
            counters: closed.counters,
            kernel_drops: closed.drops,
            late: closed.late,
            created_at_us,
            tcp: closed.tcp,
        }
    }

    fn merge(&mut self, o: &Slot) {
        self.counters.merge(&o.counters);
        self.kernel_drops += o.kernel_drops;
        self.late += o.late;
        self.tcp.add(&o.tcp);
    }
}

/// Where a device's rows are in its slice: `len` rows from `head`, wrapping. All-zero is
/// an empty ring.
#[repr(C)]
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct Ring {
    head: u32,
    len: u32,
}

impl Ring {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a row after the newest. A row that starts no later than the newest (a
    /// restarted worker in the interval it stopped in, or after a clock step back) is
    /// folded into the newest rather than show time going back.
    pub fn push(&mut self, slots: &mut [Slot], slot: Slot) {
        let cap = slots.len();
        if cap == 0 {
            return;
        }
        // A ring from a larger slice (never in the server: the size is fixed at start).
        if self.head as usize >= cap || self.len as usize > cap {
            *self = Ring::default();
        }
        if self.len > 0 {
            let newest = (self.head as usize + self.len as usize - 1) % cap;
            if slot.start <= slots[newest].start {
                slots[newest].merge(&slot);
                return;
            }
        }
        if (self.len as usize) < cap {
            slots[(self.head as usize + self.len as usize) % cap] = slot;
            self.len += 1;
        } else {
            slots[self.head as usize] = slot;
            self.head = ((self.head as usize + 1) % cap) as u32;
        }
    }

    /// The rows, oldest first.
    pub fn iter<'a>(&self, slots: &'a [Slot]) -> impl Iterator<Item = &'a Slot> + 'a {
        let (head, len, cap) = (self.head as usize, (self.len as usize).min(slots.len()), slots.len());
        (0..len).map(move |i| &slots[(head + i) % cap])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start: i64, packets_in: u64) -> Slot {
        Slot { start, secs: 1, counters: Counters { packets_in, ..Counters::default() }, ..Slot::default() }
    }

    fn starts(r: &Ring, slots: &[Slot]) -> Vec<i64> {
        r.iter(slots).map(|s| s.start).collect()
    }

    #[test]
    fn keeps_the_newest_rows_oldest_first() {
        let mut slots = vec![Slot::default(); 3];
        let mut r = Ring::default();
        for t in 1..=5 {
            r.push(&mut slots, row(t, 1));
        }
        assert_eq!(starts(&r, &slots), vec![3, 4, 5]);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn a_row_not_after_the_newest_is_folded_into_it() {
        let mut slots = vec![Slot::default(); 4];
        let mut r = Ring::default();
        r.push(&mut slots, row(10, 2));
        r.push(&mut slots, row(10, 3)); // the same interval again (a restart within it)
        r.push(&mut slots, row(9, 4)); // the clock went back
        assert_eq!(starts(&r, &slots), vec![10]);
        assert_eq!(r.iter(&slots).next().unwrap().counters.packets_in, 9);
    }

    #[test]
    fn an_empty_slice_keeps_nothing_and_does_not_panic() {
        let mut r = Ring::default();
        r.push(&mut [], row(1, 1));
        assert!(r.is_empty());
    }
}
