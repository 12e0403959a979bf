//! Interval bucketing, free of PostgreSQL: packets are put in the wall-clock-aligned
//! interval their own timestamp falls in, and an interval is closed only once the wall
//! clock is `wait` seconds past its end, so frames the kernel still held in a ring
//! block when the interval ended are counted where they belong. Time is passed in.

use crate::capture::Direction;
use crate::counters::{align, Counters, TcpCounters, TcpEvents};
use std::collections::VecDeque;

/// A finished interval: `[start, start + secs)` in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed {
    pub start: i64,
    pub secs: u32,
    pub counters: Counters,
    /// Packets counted here although their timestamp fell in an interval already
    /// closed (the clock stepped back, or the kernel held them past the wait).
    pub late: u64,
    /// Packets the kernel dropped (ring full), charged to the interval in which the
    /// worker learned of them.
    pub drops: u64,
    /// TCP events (connections, resets, retransmissions...), when flows are tracked.
    pub tcp: TcpCounters,
}

#[derive(Clone, Copy, Debug, Default)]
struct Open {
    counters: Counters,
    late: u64,
    drops: u64,
    tcp: TcpCounters,
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
    /// Start and end of `open[0]`, the oldest interval not yet published. Every later
    /// interval is `secs` long and aligned; the oldest may be shorter when the interval
    /// length changed at a boundary that is not a multiple of the new length.
    first: i64,
    first_end: i64,
    open: VecDeque<Open>,
    /// Once the interval length changes, the old series stops here (exclusive).
    stop_at: Option<i64>,
    /// The last slot found by division: its stamps [start, end), its index, and the
    /// `first_end` it was found with (the index shifts when the oldest slot closes).
    hot: Hot,
}

#[derive(Clone, Copy, Debug, Default)]
struct Hot {
    start: i64,
    end: i64,
    idx: usize,
    first_end: i64,
}

impl Intervals {
    /// Starts counting at `now`: the first interval is the one `now` falls in.
    pub fn new(secs: u32, wait: u32, now: i64) -> Intervals {
        let secs = secs.max(1);
        Intervals::starting_at(align(now, secs), secs, wait)
    }

    /// Starts counting at `start`, which need not be aligned: the first interval runs to
    /// the next multiple of `secs`, the rest are aligned.
    pub fn starting_at(start: i64, secs: u32, wait: u32) -> Intervals {
        let secs = secs.max(1);
        let mut open = VecDeque::with_capacity(MAX_OPEN);
        open.push_back(Open::default());
        let first_end = align(start, secs) + secs as i64;
        Intervals { secs, wait, first: start, first_end, open, stop_at: None, hot: Hot::default() }
    }

    pub fn secs(&self) -> u32 {
        self.secs
    }

    pub fn set_wait(&mut self, wait: u32) {
        self.wait = wait;
    }

    /// End of the interval `now` falls in (at least the end of the oldest open one).
    fn current_end(&self, now: i64) -> i64 {
        (align(now, self.secs) + self.secs as i64).max(self.first_end)
    }

    /// Counts a packet stamped `ts` (Unix seconds) seen at wall time `now`. A stamp
    /// before the oldest open interval (clock stepped back, or held past the wait) is
    /// counted there and reported as late; a stamp ahead of `now` is taken as `now`.
    pub fn record(&mut self, ts: i64, now: i64, dir: Direction, bytes: u64) {
        let ts = ts.min(now);
        let late = ts < self.first;
        let slot = self.slot_for(ts);
        slot.counters.add(dir, bytes);
        if late {
            slot.late += 1;
        }
    }

    /// Adds the TCP events of a packet stamped `ts` (placed as `record` places it).
    pub fn record_tcp(&mut self, ts: i64, now: i64, ev: TcpEvents) {
        self.slot_for(ts.min(now)).tcp.add_events(ev);
    }

    /// Charges `n` kernel drops to the interval `now` falls in.
    pub fn record_drops(&mut self, now: i64, n: u64) {
        if n > 0 {
            self.slot_for(now).drops += n;
        }
    }

    /// Inline, for every packet; the division and the queue's growth are out of line.
    #[inline]
    fn slot_for(&mut self, ts: i64) -> &mut Open {
        // Without a division: the oldest open interval, the one after it, and the one
        // the last division found (while the oldest waits out packet_wait_time, which
        // may be longer than an interval, packets go two or more places on).
        let hot = self.hot;
        let idx = if ts < self.first_end {
            0
        } else if ts < self.first_end + self.secs as i64 {
            1
        } else if ts >= hot.start && ts < hot.end && hot.first_end == self.first_end {
            hot.idx
        } else {
            self.divide(ts)
        };
        let idx = idx.min(MAX_OPEN - 1);
        if idx >= self.open.len() {
            self.grow(idx);
        }
        &mut self.open[idx]
    }

    #[inline(never)]
    fn divide(&mut self, ts: i64) -> usize {
        let start = align(ts, self.secs);
        let idx = 1 + ((start - self.first_end) / self.secs as i64) as usize;
        self.hot = Hot { start, end: start + self.secs as i64, idx, first_end: self.first_end };
        idx
    }

    #[cold]
    fn grow(&mut self, idx: usize) {
        while self.open.len() <= idx {
            self.open.push_back(Open::default());
        }
    }

    /// Wall time at which the oldest open interval is due to close.
    pub fn next_deadline(&self) -> i64 {
        self.first_end + self.wait as i64
    }

    fn done(&self) -> bool {
        self.stop_at.is_some_and(|s| self.first >= s)
    }

    fn pop(&mut self) -> Closed {
        let o = self.open.pop_front().unwrap_or_default();
        let closed = Closed {
            start: self.first,
            secs: (self.first_end - self.first) as u32,
            counters: o.counters,
            late: o.late,
            drops: o.drops,
            tcp: o.tcp,
        };
        self.first = self.first_end;
        self.first_end += self.secs as i64;
        closed
    }

    /// Removes and returns every interval due at `now`, oldest first, including empty
    /// ones (an idle interval is a real zero, and monitoring wants an unbroken series).
    pub fn close_due(&mut self, now: i64) -> Vec<Closed> {
        let mut out = Vec::new();
        let secs = self.secs as i64;
        while self.next_deadline() <= now && !self.done() {
            if self.open.is_empty() && self.stop_at.is_none() {
                // Nothing recorded beyond here: skip the part of a long gap the history
                // could not hold anyway.
                let last_due = align(now - self.wait as i64, self.secs) - secs;
                if last_due - (MAX_GAP_FILL - 1) * secs > self.first {
                    self.first = last_due - (MAX_GAP_FILL - 1) * secs;
                    self.first_end = self.first + secs;
                }
            }
            out.push(self.pop());
        }
        if self.open.is_empty() {
            self.open.push_back(Open::default());
        }
        out
    }

    /// Closes everything still open regardless of time (a device leaving the list).
    pub fn flush(&mut self) -> Vec<Closed> {
        let mut out = Vec::new();
        while !self.open.is_empty() && !self.done() {
            out.push(self.pop());
        }
        self.open.push_back(Open::default());
        out
    }
}

/// The intervals of one device, across changes of the interval length: when the length
/// changes, the interval in progress runs to its end under the old length and the new
/// series starts there, so no row covers two lengths and none is cut short.
pub struct Bucketing {
    current: Intervals,
    retiring: Option<Intervals>,
}

impl Bucketing {
    pub fn new(secs: u32, wait: u32, now: i64) -> Bucketing {
        Bucketing { current: Intervals::new(secs, wait, now), retiring: None }
    }

    pub fn secs(&self) -> u32 {
        self.current.secs
    }

    pub fn record_drops(&mut self, now: i64, n: u64) {
        self.current.record_drops(now, n);
    }

    pub fn record(&mut self, ts: i64, now: i64, dir: Direction, bytes: u64) {
        match self.retiring.as_mut() {
            Some(old) if ts.min(now) < self.current.first => old.record(ts, now, dir, bytes),
            _ => self.current.record(ts, now, dir, bytes),
        }
    }

    pub fn record_tcp(&mut self, ts: i64, now: i64, ev: TcpEvents) {
        match self.retiring.as_mut() {
            Some(old) if ts.min(now) < self.current.first => old.record_tcp(ts, now, ev),
            _ => self.current.record_tcp(ts, now, ev),
        }
    }

    /// Applies new settings at wall time `now`. Returns intervals that had to be
    /// published early (only when the length changes twice within one interval).
    pub fn reconfigure(&mut self, secs: u32, wait: u32, now: i64) -> Vec<Closed> {
        let secs = secs.max(1);
        let mut early = Vec::new();
        self.current.set_wait(wait);
        if let Some(r) = self.retiring.as_mut() {
            r.set_wait(wait);
        }
        if secs == self.current.secs {
            return early;
        }
        if let Some(mut old) = self.retiring.take() {
            early = old.flush();
        }
        let end = self.current.current_end(now);
        let mut old = std::mem::replace(&mut self.current, Intervals::starting_at(end, secs, wait));
        old.stop_at = Some(end);
        self.retiring = Some(old);
        early
    }

    pub fn next_deadline(&self) -> i64 {
        match &self.retiring {
            Some(r) => r.next_deadline().min(self.current.next_deadline()),
            None => self.current.next_deadline(),
        }
    }

    pub fn close_due(&mut self, now: i64) -> Vec<Closed> {
        let mut out = Vec::new();
        if let Some(r) = self.retiring.as_mut() {
            out = r.close_due(now);
            if r.done() {
                self.retiring = None;
            }
        }
        if self.retiring.is_none() {
            out.extend(self.current.close_due(now));
        }
        out
    }

    pub fn flush(&mut self) -> Vec<Closed> {
        let mut out = self.retiring.take().map(|mut r| r.flush()).unwrap_or_default();
        out.extend(self.current.flush());
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
        iv.record(1_000_001, i64::MAX, In, 100);
        iv.record(1_000_009, i64::MAX, Out, 50);
        iv.record(1_000_010, i64::MAX, In, 7); // next interval
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
    fn with_a_wait_longer_than_the_interval_every_packet_lands_in_its_own_interval() {
        // interval 1 s, wait 3 s: packets go two and three slots past the oldest open
        // one, where the slot is found by division once and then remembered; packets of
        // an older slot come in between, and slots close under the remembered one.
        let t0 = 1_700_000_000;
        let mut iv = Intervals::new(1, 3, t0);
        let mut rows = vec![];
        for s in 0..40 {
            // Half before the oldest slot closes, half after (the same stamp is then
            // one slot nearer the oldest).
            for i in 0..=s {
                if i == s / 2 {
                    rows.extend(iv.close_due(t0 + s));
                }
                iv.record(t0 + s, i64::MAX, In, 1);
            }
            for _ in 0..=s {
                if s >= 2 {
                    iv.record(t0 + s - 2, i64::MAX, Out, 1);
                }
            }
        }
        rows.extend(iv.flush());
        for r in &rows {
            let k = r.start - t0;
            let later = if k + 2 < 40 { k + 3 } else { 0 };
            assert_eq!(
                (r.counters.packets_in, r.counters.packets_out, r.late),
                ((k + 1) as u64, later as u64, 0),
                "{k}"
            );
        }
        assert_eq!(rows.len(), 40);
    }

    #[test]
    fn a_packet_delivered_late_but_within_the_wait_counts_in_its_interval() {
        let mut iv = Intervals::new(10, 5, 100);
        // At wall time 112 the kernel hands over a frame stamped 109.
        assert!(iv.close_due(112).is_empty());
        iv.record(109, i64::MAX, In, 1);
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
        iv.record(500, i64::MAX, In, 9); // stamped long before: clock went back
        let c = iv.close_due(1025);
        assert_eq!((c[0].start, c[0].counters.bytes_in, c[0].late), (1010, 9, 1));
    }

    #[test]
    fn clock_step_forward_is_bounded() {
        let mut iv = Intervals::new(1, 1, 0);
        iv.record(10_000_000, i64::MAX, Out, 3); // far future stamp: into the newest open slot
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
        iv.record(3, i64::MAX, In, 1);
        iv.record(13, i64::MAX, In, 2);
        let c = iv.flush();
        assert_eq!(c.iter().map(|x| x.counters.bytes_in).sum::<u64>(), 3);
        assert_eq!(c[1].start, 10);
    }

    #[test]
    fn negative_and_odd_intervals_align_correctly() {
        assert_eq!(align(-1, 10), -10);
        assert_eq!(align(59, 7), 56);
        let mut iv = Intervals::new(0, 0, 5); // 0 is treated as 1 s, never divides by 0
        iv.record(5, i64::MAX, In, 1);
        assert_eq!(iv.close_due(6)[0].counters.packets_in, 1);
    }

    #[test]
    fn a_stamp_ahead_of_now_counts_now_not_in_a_far_slot() {
        let mut iv = Intervals::new(10, 5, 1000);
        iv.record(1_000_000, 1003, In, 5); // clock stepped back after stamping
        assert_eq!(iv.open.len(), 1);
        let c = iv.close_due(1015);
        assert_eq!((c[0].start, c[0].counters.bytes_in), (1000, 5));
    }

    fn contiguous(rows: &[Closed]) {
        for w in rows.windows(2) {
            assert_eq!(w[0].start + w[0].secs as i64, w[1].start, "gap or overlap: {:?} {:?}", w[0], w[1]);
        }
    }

    #[test]
    fn interval_change_finishes_the_old_interval_then_starts_aligned_ones() {
        let mut b = Bucketing::new(2, 1, 10);
        b.record(10, 10, In, 1);
        b.record(11, 11, In, 2);
        assert!(b.reconfigure(5, 1, 11).is_empty());
        assert_eq!(b.secs(), 5);
        b.record(11, 11, In, 4); // still the old [10, 12)
        b.record(12, 12, In, 8); // new, shortened [12, 15)
        b.record(16, 16, Out, 16); // new [15, 20)
        let mut rows = b.close_due(13);
        assert_eq!(rows.len(), 1);
        rows.extend(b.close_due(30));
        let got: Vec<(i64, u32, u64)> =
            rows.iter().map(|r| (r.start, r.secs, r.counters.bytes_in + r.counters.bytes_out)).collect();
        assert_eq!(got, vec![(10, 2, 7), (12, 3, 8), (15, 5, 16), (20, 5, 0)]);
        contiguous(&rows);
        assert_eq!(rows.iter().map(|r| r.late).sum::<u64>(), 0);
    }

    #[test]
    fn interval_change_back_and_forth_loses_nothing() {
        let mut b = Bucketing::new(3, 1, 0);
        let mut total = 0;
        let mut rows = Vec::new();
        for t in 0..100i64 {
            b.record(t, t, In, 1);
            total += 1;
            if t % 7 == 3 {
                rows.extend(b.reconfigure([1, 2, 3, 5][(t as usize / 7) % 4], 1, t));
            }
            rows.extend(b.close_due(t));
        }
        rows.extend(b.flush());
        contiguous(&rows);
        assert_eq!(rows.iter().map(|r| r.counters.packets_in).sum::<u64>(), total);
        assert!(rows.iter().all(|r| r.secs >= 1 && r.secs <= 5));
    }

    #[test]
    fn only_the_wait_changes() {
        let mut b = Bucketing::new(10, 5, 100);
        b.reconfigure(10, 1, 101);
        assert_eq!(b.next_deadline(), 111);
        assert_eq!(b.close_due(111).len(), 1);
    }

    #[test]
    fn drops_go_to_the_interval_in_which_they_are_learned() {
        let mut b = Bucketing::new(10, 5, 100);
        b.record(101, 101, In, 1);
        b.record_drops(113, 7); // learned while [100,110) waits for its close
        let rows = b.close_due(130);
        let got: Vec<(i64, u64)> = rows.iter().map(|r| (r.start, r.drops)).collect();
        assert_eq!(got, vec![(100, 0), (110, 7)]); // [120,130) is due at 135
    }
}
