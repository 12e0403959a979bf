//! Interval bucketing, free of PostgreSQL: packets are put in the wall-clock-aligned
//! interval their own timestamp falls in, and an interval is closed only once the wall
//! clock is `wait` seconds past its end, so frames the kernel still held in a ring
//! block when the interval ended are counted where they belong. Time is passed in.

use crate::capture::Direction;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Counters {
    pub fn add(&mut self, dir: Direction, bytes: u64) {
        match dir {
            Direction::In => {
                self.packets_in += 1;
                self.bytes_in += bytes;
            }
            Direction::Out => {
                self.packets_out += 1;
                self.bytes_out += bytes;
            }
        }
    }

    pub fn packets(&self) -> u64 {
        self.packets_in + self.packets_out
    }
}

/// A finished interval: `[start, start + secs)` in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed {
    pub start: i64,
    pub secs: u32,
    pub counters: Counters,
    /// Packets counted here although their timestamp fell in an interval already
    /// closed (the clock stepped back, or the kernel held them past the wait).
    pub late: u64,
}

/// Most intervals kept open at once. Packets stamped further ahead than this (a clock
/// step forward) go into the newest one instead of growing the queue without bound.
const MAX_OPEN: usize = 64;
/// Most empty intervals published for a gap (the worker slept through a clock jump);
/// more than the history holds would only push real rows out.
pub const MAX_GAP_FILL: i64 = 60;

pub struct Intervals {
    secs: u32,
    wait: u32,
    /// Start of `open[0]`, the oldest interval not yet published.
    first: i64,
    open: VecDeque<(Counters, u64)>,
}

pub fn align(t: i64, secs: u32) -> i64 {
    t - t.rem_euclid(secs as i64)
}

impl Intervals {
    /// Starts counting at `now`: the first interval is the one `now` falls in.
    pub fn new(secs: u32, wait: u32, now: i64) -> Intervals {
        let secs = secs.max(1);
        let mut open = VecDeque::with_capacity(MAX_OPEN);
        open.push_back((Counters::default(), 0));
        Intervals { secs, wait, first: align(now, secs), open }
    }

    pub fn secs(&self) -> u32 {
        self.secs
    }

    pub fn record(&mut self, ts: i64, dir: Direction, bytes: u64) {
        let start = align(ts, self.secs);
        let late = start < self.first;
        let idx = if late { 0 } else { ((start - self.first) / self.secs as i64) as usize };
        let idx = idx.min(MAX_OPEN - 1);
        while self.open.len() <= idx {
            self.open.push_back((Counters::default(), 0));
        }
        let slot = &mut self.open[idx];
        slot.0.add(dir, bytes);
        if late {
            slot.1 += 1;
        }
    }

    /// Wall time at which the oldest open interval is due to close.
    pub fn next_deadline(&self) -> i64 {
        self.first + self.secs as i64 + self.wait as i64
    }

    /// Removes and returns every interval due at `now`, oldest first, including empty
    /// ones (an idle interval is a real zero, and monitoring wants an unbroken series).
    pub fn close_due(&mut self, now: i64) -> Vec<Closed> {
        let mut out = Vec::new();
        let secs = self.secs as i64;
        while self.next_deadline() <= now {
            if self.open.is_empty() {
                // Nothing recorded beyond here: skip the part of a long gap the history
                // could not hold anyway.
                let last_due = align(now - self.wait as i64, self.secs) - secs;
                self.first = self.first.max(last_due - (MAX_GAP_FILL - 1) * secs);
            }
            let (counters, late) = self.open.pop_front().unwrap_or_default();
            out.push(Closed { start: self.first, secs: self.secs, counters, late });
            self.first += secs;
        }
        if self.open.is_empty() {
            self.open.push_back((Counters::default(), 0));
        }
        out
    }

    /// Closes everything still open regardless of time (used when the interval length
    /// changes, so no counted packet is lost).
    pub fn flush(&mut self) -> Vec<Closed> {
        let mut out = Vec::new();
        while let Some((counters, late)) = self.open.pop_front() {
            out.push(Closed { start: self.first, secs: self.secs, counters, late });
            self.first += self.secs as i64;
        }
        self.open.push_back((Counters::default(), 0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{In, Out};

    #[test]
    fn packets_land_in_their_own_aligned_interval() {
        let mut iv = Intervals::new(10, 5, 1_000_003);
        iv.record(1_000_001, In, 100);
        iv.record(1_000_009, Out, 50);
        iv.record(1_000_010, In, 7); // next interval
        assert!(iv.close_due(1_000_014).is_empty(), "wait time not over");
        let c = iv.close_due(1_000_015);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].start, 1_000_000);
        assert_eq!(c[0].secs, 10);
        assert_eq!(c[0].counters, Counters { packets_in: 1, packets_out: 1, bytes_in: 100, bytes_out: 50 });
        let c = iv.close_due(1_000_025);
        assert_eq!(c[0].start, 1_000_010);
        assert_eq!(c[0].counters.bytes_in, 7);
    }

    #[test]
    fn a_packet_delivered_late_but_within_the_wait_counts_in_its_interval() {
        let mut iv = Intervals::new(10, 5, 100);
        // At wall time 112 the kernel hands over a frame stamped 109.
        assert!(iv.close_due(112).is_empty());
        iv.record(109, In, 1);
        let c = iv.close_due(115);
        assert_eq!((c[0].start, c[0].counters.packets_in, c[0].late), (100, 1, 0));
    }

    #[test]
    fn idle_intervals_are_published_as_zero() {
        let mut iv = Intervals::new(2, 1, 10);
        let c = iv.close_due(19);
        let starts: Vec<i64> = c.iter().map(|x| x.start).collect();
        assert_eq!(starts, vec![10, 12, 14, 16]);
        assert!(c.iter().all(|x| x.counters == Counters::default()));
    }

    #[test]
    fn clock_step_back_counts_into_the_oldest_open_interval() {
        let mut iv = Intervals::new(10, 5, 1000);
        iv.close_due(1015); // 1000 closed, 1010 open
        iv.record(500, In, 9); // stamped long before: clock went back
        let c = iv.close_due(1025);
        assert_eq!((c[0].start, c[0].counters.bytes_in, c[0].late), (1010, 9, 1));
    }

    #[test]
    fn clock_step_forward_is_bounded() {
        let mut iv = Intervals::new(1, 1, 0);
        iv.record(10_000_000, Out, 3); // far future stamp: into the newest open slot
        assert!(iv.open.len() <= MAX_OPEN);
        let c = iv.close_due(100);
        assert_eq!(c.iter().map(|x| x.counters.bytes_out).sum::<u64>(), 3);
        // Wall clock jumps a day ahead: at most MAX_GAP_FILL empty rows, ending right
        // before the interval now open.
        let c = iv.close_due(86_400 + 100);
        assert!(c.len() as i64 <= MAX_GAP_FILL + 1, "{}", c.len());
        assert_eq!(c.last().unwrap().start, 86_400 + 98);
        let starts: Vec<i64> = c.iter().map(|x| x.start).collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn flush_returns_everything_counted() {
        let mut iv = Intervals::new(10, 5, 0);
        iv.record(3, In, 1);
        iv.record(13, In, 2);
        let c = iv.flush();
        assert_eq!(c.iter().map(|x| x.counters.bytes_in).sum::<u64>(), 3);
        assert_eq!(c[1].start, 10);
    }

    #[test]
    fn negative_and_odd_intervals_align_correctly() {
        assert_eq!(align(-1, 10), -10);
        assert_eq!(align(59, 7), 56);
        let mut iv = Intervals::new(0, 0, 5); // 0 is treated as 1 s, never divides by 0
        iv.record(5, In, 1);
        assert_eq!(iv.close_due(6)[0].counters.packets_in, 1);
    }
}
