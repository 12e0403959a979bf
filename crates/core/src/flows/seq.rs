//! TCP sequence tracking for one direction of a flow: which sequence numbers were
//! already seen, so a segment can be told apart as new, retransmitted (seen before) or
//! out of order (filling a gap), with a bounded memory of gaps.

fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Gaps remembered per direction. More simultaneous gaps than this (heavy loss or
/// reordering) forget the oldest; a segment filling a forgotten gap then counts as a
/// retransmission.
const MAX_GAPS: usize = 4;

/// The sequence numbers seen in one direction: everything below `high` except the gaps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqTrack {
    valid: bool,
    high: u32,
    gaps: u8,
    /// [start, end) of each gap; all lie below `high`.
    gap: [(u32, u32); MAX_GAPS],
}

impl SeqTrack {
    /// Position relative to `high` (negative below it), wrap-safe within 2 GiB.
    fn rel(&self, x: u32) -> i64 {
        x.wrapping_sub(self.high) as i32 as i64
    }

    fn add_gap(&mut self, start: u32, end: u32) {
        if self.gaps as usize == MAX_GAPS {
            let oldest = (0..MAX_GAPS).min_by_key(|&i| self.rel(self.gap[i].0)).unwrap_or(0);
            self.gap[oldest] = (start, end);
        } else {
            self.gap[self.gaps as usize] = (start, end);
            self.gaps += 1;
        }
    }

    /// Takes [a, b) (below `high`) out of the gaps; returns how many of its numbers
    /// were in a gap, i.e. never seen before.
    fn take_unseen(&mut self, a: u32, b: u32) -> i64 {
        let (ra, rb) = (self.rel(a), self.rel(b));
        let mut unseen = 0;
        let mut kept: [(u32, u32); MAX_GAPS * 2] = [(0, 0); MAX_GAPS * 2];
        let mut n = 0;
        for &(s, e) in &self.gap[..self.gaps as usize] {
            let (rs, re) = (self.rel(s), self.rel(e));
            let (lo, hi) = (ra.max(rs), rb.min(re));
            if lo >= hi {
                kept[n] = (s, e);
                n += 1;
                continue;
            }
            unseen += hi - lo;
            if rs < lo {
                kept[n] = (s, a);
                n += 1;
            }
            if hi < re {
                kept[n] = (b, e);
                n += 1;
            }
        }
        // A segment in the middle of a gap splits it in two; keep the newest gaps.
        kept[..n].sort_by_key(|&(s, _)| std::cmp::Reverse(self.rel(s)));
        let n = n.min(MAX_GAPS);
        self.gap[..n].copy_from_slice(&kept[..n]);
        self.gaps = n as u8;
        unseen
    }

    /// Records the segment [seq, end) if it starts exactly where this direction's
    /// highest sequence number ended (the in-order case, where `segment` would find
    /// neither a retransmission nor a gap); returns false, changing nothing, otherwise.
    #[inline]
    pub fn extend_in_order(&mut self, seq: u32, end: u32) -> bool {
        let in_order = self.valid && seq == self.high;
        if in_order {
            self.high = end;
        }
        in_order
    }

    /// Records the segment [seq, end); returns (retransmission, out of order): a
    /// retransmission when part of it had been seen already, out of order when part of
    /// it fills a gap.
    pub fn segment(&mut self, seq: u32, end: u32) -> (bool, bool) {
        if !self.valid {
            *self = SeqTrack { valid: true, high: end, ..SeqTrack::default() };
            return (false, false);
        }
        if !seq_lt(seq, self.high) {
            if seq_lt(self.high, seq) {
                self.add_gap(self.high, seq);
            }
            self.high = end;
            return (false, false);
        }
        let below_end = if seq_lt(self.high, end) { self.high } else { end };
        let covered = self.rel(below_end) - self.rel(seq);
        let unseen = self.take_unseen(seq, below_end);
        if seq_lt(self.high, end) {
            self.high = end;
        }
        (unseen < covered, unseen > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_gaps_forget_the_oldest() {
        let mut tr = SeqTrack::default();
        tr.segment(0, 10);
        for i in 1..=6u32 {
            tr.segment(i * 20, i * 20 + 10); // gaps [10,20), [30,40), ...
        }
        assert_eq!(tr.gaps as usize, MAX_GAPS);
        assert_eq!(tr.segment(110, 120), (false, true)); // a remembered gap
        assert_eq!(tr.segment(10, 20), (true, false)); // forgotten: counted as seen
    }
}
