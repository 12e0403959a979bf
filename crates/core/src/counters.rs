//! Counter types shared by the interval bucketing (`stats`), the flow table (`flows`)
//! and shared memory: packets and bytes per direction, TCP events, and interval
//! alignment. Plain data with no dependencies of its own, so every other room can use it
//! without importing each other.

use crate::capture::Direction;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Counts wrap at 2^64 (a saved file may hold any count: it is not checked against
/// what it adds to), in debug builds as in release ones.
impl Counters {
    pub fn add(&mut self, dir: Direction, bytes: u64) {
        match dir {
            Direction::In => {
                self.packets_in = self.packets_in.wrapping_add(1);
                self.bytes_in = self.bytes_in.wrapping_add(bytes);
            }
            Direction::Out => {
                self.packets_out = self.packets_out.wrapping_add(1);
                self.bytes_out = self.bytes_out.wrapping_add(bytes);
            }
        }
    }

    pub fn packets(&self) -> u64 {
        self.packets_in.wrapping_add(self.packets_out)
    }

    pub fn merge(&mut self, o: &Counters) {
        self.packets_in = self.packets_in.wrapping_add(o.packets_in);
        self.packets_out = self.packets_out.wrapping_add(o.packets_out);
        self.bytes_in = self.bytes_in.wrapping_add(o.bytes_in);
        self.bytes_out = self.bytes_out.wrapping_add(o.bytes_out);
    }

    /// What was counted since `base` was taken.
    pub fn since(&self, base: &Counters) -> Counters {
        Counters {
            packets_in: self.packets_in.saturating_sub(base.packets_in),
            packets_out: self.packets_out.saturating_sub(base.packets_out),
            bytes_in: self.bytes_in.saturating_sub(base.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(base.bytes_out),
        }
    }
}

/// TCP events, per flow, per device interval, per role and database.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Connection attempts: SYN without ACK from a client.
    pub syn: u64,
    pub fin_in: u64,
    pub fin_out: u64,
    pub rst_in: u64,
    pub rst_out: u64,
    /// Data (or SYN/FIN) segments whose sequence range starts before the highest one
    /// already seen in that direction: retransmissions (and reordering, which a
    /// capture cannot tell apart).
    pub retrans_in: u64,
    pub retrans_out: u64,
    /// Segments advertising a zero receive window (the sender's receive buffer is full).
    pub zero_window_in: u64,
    pub zero_window_out: u64,
    /// Segments that filled a gap left earlier in the sequence space: reordered on the
    /// way, or re-sent after a loss before this host (whose first copy was never seen,
    /// so it is not a retransmission by the definition above).
    pub ooo_in: u64,
    pub ooo_out: u64,
}

impl TcpCounters {
    pub fn add(&mut self, o: &TcpCounters) {
        self.syn = self.syn.wrapping_add(o.syn);
        self.fin_in = self.fin_in.wrapping_add(o.fin_in);
        self.fin_out = self.fin_out.wrapping_add(o.fin_out);
        self.rst_in = self.rst_in.wrapping_add(o.rst_in);
        self.rst_out = self.rst_out.wrapping_add(o.rst_out);
        self.retrans_in = self.retrans_in.wrapping_add(o.retrans_in);
        self.retrans_out = self.retrans_out.wrapping_add(o.retrans_out);
        self.zero_window_in = self.zero_window_in.wrapping_add(o.zero_window_in);
        self.zero_window_out = self.zero_window_out.wrapping_add(o.zero_window_out);
        self.ooo_in = self.ooo_in.wrapping_add(o.ooo_in);
        self.ooo_out = self.ooo_out.wrapping_add(o.ooo_out);
    }

    pub fn sub(&self, o: &TcpCounters) -> TcpCounters {
        TcpCounters {
            syn: self.syn.saturating_sub(o.syn),
            fin_in: self.fin_in.saturating_sub(o.fin_in),
            fin_out: self.fin_out.saturating_sub(o.fin_out),
            rst_in: self.rst_in.saturating_sub(o.rst_in),
            rst_out: self.rst_out.saturating_sub(o.rst_out),
            retrans_in: self.retrans_in.saturating_sub(o.retrans_in),
            retrans_out: self.retrans_out.saturating_sub(o.retrans_out),
            zero_window_in: self.zero_window_in.saturating_sub(o.zero_window_in),
            zero_window_out: self.zero_window_out.saturating_sub(o.zero_window_out),
            ooo_in: self.ooo_in.saturating_sub(o.ooo_in),
            ooo_out: self.ooo_out.saturating_sub(o.ooo_out),
        }
    }
}

impl TcpCounters {
    pub fn is_zero(&self) -> bool {
        *self == TcpCounters::default()
    }

    /// Counts one segment's events. Most segments have none: that case is one test.
    #[inline]
    pub fn add_events(&mut self, ev: TcpEvents) {
        if ev.is_empty() {
            return;
        }
        let one = |flag| ev.contains(flag) as u64;
        self.syn += one(TcpEvents::SYN);
        self.fin_in += one(TcpEvents::FIN_IN);
        self.fin_out += one(TcpEvents::FIN_OUT);
        self.rst_in += one(TcpEvents::RST_IN);
        self.rst_out += one(TcpEvents::RST_OUT);
        self.retrans_in += one(TcpEvents::RETRANS_IN);
        self.retrans_out += one(TcpEvents::RETRANS_OUT);
        self.zero_window_in += one(TcpEvents::ZERO_WINDOW_IN);
        self.zero_window_out += one(TcpEvents::ZERO_WINDOW_OUT);
        self.ooo_in += one(TcpEvents::OOO_IN);
        self.ooo_out += one(TcpEvents::OOO_OUT);
    }
}

bitflags::bitflags! {
    /// What one TCP segment tells, one bit per counter of `TcpCounters` (a segment adds
    /// at most one to each). The per-packet path carries these two bytes instead of
    /// eleven counters: zeroing, copying, testing and adding those cost more than the
    /// rest of a segment's bookkeeping.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TcpEvents: u16 {
        const SYN = 1 << 0;
        const FIN_IN = 1 << 1;
        const FIN_OUT = 1 << 2;
        const RST_IN = 1 << 3;
        const RST_OUT = 1 << 4;
        const RETRANS_IN = 1 << 5;
        const RETRANS_OUT = 1 << 6;
        const ZERO_WINDOW_IN = 1 << 7;
        const ZERO_WINDOW_OUT = 1 << 8;
        const OOO_IN = 1 << 9;
        const OOO_OUT = 1 << 10;
    }
}

impl TcpEvents {
    /// The "in" flag when `inbound`, else the "out" one.
    #[inline]
    pub fn by_dir(inbound: bool, in_flag: TcpEvents, out_flag: TcpEvents) -> TcpEvents {
        if inbound {
            in_flag
        } else {
            out_flag
        }
    }
}

impl From<TcpEvents> for TcpCounters {
    fn from(ev: TcpEvents) -> TcpCounters {
        let mut c = TcpCounters::default();
        c.add_events(ev);
        c
    }
}

/// Start of the `secs`-long interval that `t` (Unix seconds) falls in, aligned to the
/// epoch; correct for negative `t` too.
pub fn align(t: i64, secs: u32) -> i64 {
    t - t.rem_euclid(secs as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_counts_one_in_its_own_counter() {
        let mut seen = TcpCounters::default();
        for (name, flag) in TcpEvents::all().iter_names() {
            let c = TcpCounters::from(flag);
            let fields = [
                c.syn,
                c.fin_in,
                c.fin_out,
                c.rst_in,
                c.rst_out,
                c.retrans_in,
                c.retrans_out,
                c.zero_window_in,
                c.zero_window_out,
                c.ooo_in,
                c.ooo_out,
            ];
            assert_eq!(fields.iter().sum::<u64>(), 1, "{name} counts exactly one");
            seen.add(&c);
        }
        // Eleven flags, eleven counters, each reached once: no two flags share one.
        let all = TcpCounters::from(TcpEvents::all());
        assert_eq!(seen, all);
        let ones = TcpCounters {
            syn: 1,
            fin_in: 1,
            fin_out: 1,
            rst_in: 1,
            rst_out: 1,
            retrans_in: 1,
            retrans_out: 1,
            zero_window_in: 1,
            zero_window_out: 1,
            ooo_in: 1,
            ooo_out: 1,
        };
        assert_eq!(all, ones);
        assert!(TcpCounters::from(TcpEvents::empty()).is_zero());
    }
}
