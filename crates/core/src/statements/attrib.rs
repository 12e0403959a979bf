//! Attribution: a backend reads its socket's cumulative TCP counters at statement
//! boundaries; this turns two readings into charges to statements. The rules (documented
//! in docs/statements.md, one per protocol case):
//! - bytes *out* since the previous reading belong to the statement that was current
//!   before it (its result had to be flushed before the client could send the next one);
//!   before the first statement that is the connection's setup;
//! - bytes *in* at a statement's start belong to that statement (its text just arrived);
//! - a reading at the end of a statement (COPY FROM STDIN: its data arrives while it
//!   runs) charges everything to the statement itself;
//! - at backend exit what is left goes to the last statement (or the setup);
//! - segments out, retransmissions and the RTT go with the bytes out, segments in with
//!   the bytes in.
//!
//! So every byte the counters ever show is charged exactly once: the sum over a
//! connection's charges is the socket's final counters.

/// Cumulative counters of one TCP socket as the kernel reports them (`struct tcp_info`).
/// A field the kernel did not return (an older kernel's shorter struct) is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub segs_in: Option<u32>,
    pub segs_out: Option<u32>,
    pub retrans: Option<u32>,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: Option<u32>,
}

/// What is charged to one statement (and summed per table entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// Executions (for the setup row: connections).
    pub calls: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub segs_in: u64,
    pub segs_out: u64,
    pub retrans: u64,
    /// RTT samples, one per charge that carried bytes out.
    pub rtt_sum_us: u64,
    pub rtt_samples: u64,
    pub rtt_max_us: u64,
}

impl Figures {
    pub fn add(&mut self, o: &Figures) {
        self.calls = self.calls.wrapping_add(o.calls);
        self.bytes_in = self.bytes_in.wrapping_add(o.bytes_in);
        self.bytes_out = self.bytes_out.wrapping_add(o.bytes_out);
        self.segs_in = self.segs_in.wrapping_add(o.segs_in);
        self.segs_out = self.segs_out.wrapping_add(o.segs_out);
        self.retrans = self.retrans.wrapping_add(o.retrans);
        self.rtt_sum_us = self.rtt_sum_us.wrapping_add(o.rtt_sum_us);
        self.rtt_samples = self.rtt_samples.wrapping_add(o.rtt_samples);
        self.rtt_max_us = self.rtt_max_us.max(o.rtt_max_us);
    }

    pub fn is_zero(&self) -> bool {
        *self == Figures::default()
    }
}

/// Whom a charge is for. A statement is named by the caller (the glue knows its query
/// id, role and database); the setup is resolved to its role and database by the glue
/// when it applies the charge, because at authentication neither is known yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<K> {
    Setup,
    Statement(K),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge<K> {
    pub target: Target<K>,
    pub figures: Figures,
}

/// At most two charges come out of one reading: the outgoing part to the previous
/// statement, the incoming part to the new one.
pub type Charges<K> = [Option<Charge<K>>; 2];

fn sub64(a: Option<u64>, b: Option<u64>) -> u64 {
    match (a, b) {
        // Counters never go back; saturate so a bogus reading cannot charge 2^64 bytes.
        (Some(a), Some(b)) => a.saturating_sub(b),
        (Some(a), None) => a,
        _ => 0,
    }
}

fn sub32(a: Option<u32>, b: Option<u32>) -> u64 {
    match (a, b) {
        // Segment counters are 32 bits in the kernel and wrap.
        (Some(a), Some(b)) => a.wrapping_sub(b) as u64,
        (Some(a), None) => a as u64,
        _ => 0,
    }
}

/// The outgoing and incoming parts of the change between two readings.
fn split(last: &Sample, now: &Sample) -> (Figures, Figures) {
    let bytes_out = sub64(now.bytes_out, last.bytes_out);
    let rtt = now.rtt_us.filter(|_| bytes_out > 0).map(u64::from);
    let out = Figures {
        bytes_out,
        segs_out: sub32(now.segs_out, last.segs_out),
        retrans: sub32(now.retrans, last.retrans),
        rtt_sum_us: rtt.unwrap_or(0),
        rtt_samples: rtt.is_some() as u64,
        rtt_max_us: rtt.unwrap_or(0),
        ..Figures::default()
    };
    let inn = Figures {
        bytes_in: sub64(now.bytes_in, last.bytes_in),
        segs_in: sub32(now.segs_in, last.segs_in),
        ..Figures::default()
    };
    (out, inn)
}

/// One backend's attribution state: its last reading and where outgoing bytes go.
#[derive(Clone, Copy, Debug)]
pub struct Tracker<K> {
    /// The reading the next delta starts from. A socket's counters start at zero when
    /// the connection is made, so the default reading is right for its first delta.
    last: Sample,
    /// The statement bytes out are charged to; `Setup` until the first statement.
    out_to: Target<K>,
    /// Setup figures not yet handed out: the setup's role and database are only known
    /// once the session exists, so it is charged at the first statement or at exit.
    setup: Figures,
}

impl<K: Copy> Default for Tracker<K> {
    fn default() -> Self {
        Tracker { last: Sample::default(), out_to: Target::Setup, setup: Figures { calls: 1, ..Figures::default() } }
    }
}

impl<K: Copy> Tracker<K> {
    /// A connection just made: nothing charged yet, the setup is current.
    pub fn new() -> Self {
        Self::default()
    }

    /// Authentication is done: everything received so far (startup packet, SSL or GSS
    /// negotiation, password) is setup, and so is what is sent until the first statement.
    pub fn authenticated(&mut self, now: Sample) {
        let (out, inn) = split(&self.last, &now);
        self.setup.add(&out);
        self.setup.add(&inn);
        self.last = now;
    }

    /// A top-level statement starts: bytes out since the last reading go to the
    /// previous statement (or the setup), bytes in to this one, with one call.
    pub fn start(&mut self, key: K, now: Sample) -> Charges<K> {
        let (out, mut inn) = split(&self.last, &now);
        self.last = now;
        inn.calls = 1;
        let previous = self.charge_out(out);
        self.out_to = Target::Statement(key);
        [previous, Some(Charge { target: Target::Statement(key), figures: inn })]
    }

    /// The current statement ends and data may have arrived while it ran (COPY FROM
    /// STDIN): everything since the last reading is its own.
    pub fn finish(&mut self, now: Sample) -> Charges<K> {
        self.everything_to_current(now)
    }

    /// The backend exits: what is left goes to the last statement, or the setup.
    pub fn exit(&mut self, now: Sample) -> Charges<K> {
        self.everything_to_current(now)
    }

    /// Counting was off for a while: start again from `now`, charging nothing for the
    /// time it was off.
    pub fn resync(&mut self, now: Sample) {
        self.last = now;
    }

    fn everything_to_current(&mut self, now: Sample) -> Charges<K> {
        let (mut out, inn) = split(&self.last, &now);
        self.last = now;
        out.add(&inn);
        [self.charge_out(out), None]
    }

    /// A charge of `f` to `out_to`; the pending setup goes with the first charge that is
    /// not for the setup, or with any charge for it.
    fn charge_out(&mut self, f: Figures) -> Option<Charge<K>> {
        match self.out_to {
            Target::Setup => {
                let mut setup = std::mem::take(&mut self.setup);
                setup.add(&f);
                (!setup.is_zero()).then_some(Charge { target: Target::Setup, figures: setup })
            }
            t => (!f.is_zero()).then_some(Charge { target: t, figures: f }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(bytes_in: u64, bytes_out: u64) -> Sample {
        Sample {
            bytes_in: Some(bytes_in),
            bytes_out: Some(bytes_out),
            segs_in: Some(bytes_in as u32 / 100),
            segs_out: Some(bytes_out as u32 / 100),
            retrans: Some(0),
            rtt_us: Some(50),
        }
    }

    /// Sums every charge per target, as the table would.
    #[derive(Default)]
    struct Book(Vec<(Target<u32>, Figures)>);
    impl Book {
        fn take(&mut self, c: Charges<u32>) {
            for c in c.into_iter().flatten() {
                match self.0.iter_mut().find(|(t, _)| *t == c.target) {
                    Some((_, f)) => f.add(&c.figures),
                    None => self.0.push((c.target, c.figures)),
                }
            }
        }
        fn get(&self, t: Target<u32>) -> Figures {
            self.0.iter().find(|(x, _)| *x == t).map(|(_, f)| *f).unwrap_or_default()
        }
        fn total(&self) -> (u64, u64) {
            self.0.iter().fold((0, 0), |(i, o), (_, f)| (i + f.bytes_in, o + f.bytes_out))
        }
    }

    #[test]
    fn out_goes_to_the_previous_statement_in_to_the_new_one() {
        let mut t = Tracker::<u32>::new();
        let mut b = Book::default();
        t.authenticated(s(90, 20)); // startup packet in; auth request out
        b.take(t.start(1, s(120, 400))); // parameter status etc. out; "SELECT big" in
        b.take(t.start(2, s(150, 5_000_400))); // big result out; "SELECT small" in
        b.take(t.start(1, s(180, 5_000_500)));
        b.take(t.exit(s(185, 5_000_600))); // Terminate in, last result out
        let setup = b.get(Target::Setup);
        assert_eq!((setup.calls, setup.bytes_in, setup.bytes_out), (1, 90, 400));
        let big = b.get(Target::Statement(1));
        assert_eq!((big.calls, big.bytes_in, big.bytes_out), (2, 30 + 30 + 5, 5_000_000 + 100));
        let small = b.get(Target::Statement(2));
        assert_eq!((small.calls, small.bytes_in, small.bytes_out), (1, 30, 100));
        assert_eq!(b.total(), (185, 5_000_600));
    }

    #[test]
    fn copy_data_arriving_during_the_statement_is_its_own() {
        let mut t = Tracker::<u32>::new();
        let mut b = Book::default();
        t.authenticated(s(90, 20));
        b.take(t.start(7, s(130, 300))); // COPY ... FROM STDIN text
        b.take(t.finish(s(1_000_130, 310))); // the data, CopyInResponse
        b.take(t.start(8, s(1_000_160, 330))); // CommandComplete/ReadyForQuery out
        let copy = b.get(Target::Statement(7));
        assert_eq!((copy.bytes_in, copy.bytes_out), (1_000_040, 30));
        assert_eq!(b.get(Target::Statement(8)).bytes_in, 30);
        assert_eq!(b.total(), (1_000_160, 330));
    }

    #[test]
    fn a_connection_without_statements_is_all_setup() {
        let mut t = Tracker::<u32>::new();
        let mut b = Book::default();
        t.authenticated(s(90, 20));
        b.take(t.exit(s(95, 380)));
        assert_eq!(b.0.len(), 1);
        let setup = b.get(Target::Setup);
        assert_eq!((setup.calls, setup.bytes_in, setup.bytes_out), (1, 95, 380));
    }

    #[test]
    fn without_an_authentication_reading_the_first_statement_still_splits() {
        // The in-bytes of the startup then go with the first statement's text.
        let mut t = Tracker::<u32>::new();
        let mut b = Book::default();
        b.take(t.start(1, s(120, 400)));
        assert_eq!(b.get(Target::Setup).bytes_out, 400);
        assert_eq!(b.get(Target::Statement(1)).bytes_in, 120);
    }

    #[test]
    fn counting_off_then_on_charges_nothing_for_the_gap() {
        let mut t = Tracker::<u32>::new();
        let mut b = Book::default();
        t.authenticated(s(90, 20));
        b.take(t.start(1, s(120, 400)));
        t.resync(s(10_000, 20_000));
        b.take(t.start(2, s(10_030, 20_100)));
        assert_eq!(b.get(Target::Statement(1)).bytes_out, 100);
        assert_eq!(b.get(Target::Statement(2)).bytes_in, 30);
    }

    #[test]
    fn missing_fields_and_wrapping_segments() {
        let mut t = Tracker::<u32>::new();
        let a = Sample { bytes_in: Some(10), bytes_out: None, segs_in: Some(u32::MAX - 1), ..Sample::default() };
        t.resync(a);
        let now = Sample { bytes_in: Some(40), bytes_out: None, segs_in: Some(3), ..Sample::default() };
        let [_, inn] = t.start(1, now);
        let inn = inn.unwrap().figures;
        assert_eq!((inn.bytes_in, inn.segs_in), (30, 5));
        // Backwards counters (never from a real kernel) charge nothing.
        let [_, inn] = t.start(2, Sample { bytes_in: Some(5), ..now });
        assert_eq!(inn.unwrap().figures.bytes_in, 0);
    }

    #[test]
    fn rtt_is_sampled_with_bytes_out_only() {
        let mut t = Tracker::<u32>::new();
        let mut b = Book::default();
        t.authenticated(s(90, 20));
        b.take(t.start(1, Sample { rtt_us: Some(70), ..s(120, 400) }));
        b.take(t.start(2, Sample { rtt_us: Some(30), ..s(150, 500) }));
        b.take(t.start(3, Sample { rtt_us: Some(999), ..s(180, 500) })); // nothing out: no sample
        b.take(t.start(4, Sample { rtt_us: Some(20), ..s(200, 600) }));
        let one = b.get(Target::Statement(1));
        assert_eq!((one.rtt_samples, one.rtt_sum_us, one.rtt_max_us), (1, 30, 30));
        let two = b.get(Target::Statement(2));
        assert_eq!((two.rtt_samples, two.rtt_max_us), (0, 0));
        assert_eq!(b.get(Target::Setup).rtt_max_us, 70);
    }
}
