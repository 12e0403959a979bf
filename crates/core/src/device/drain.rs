//! The path every captured packet takes: out of the device's sources (both of them while
//! a replaced one hands over), through the direction rule, into the interval buckets,
//! the device's totals and, when flows are on, the connection table.

use super::*;

/// What the per-frame shortcut remembers of the last connection.
struct LastFlow {
    conn: packet::Ipv4Conn,
    pkttype: u8,
    by_ports: bool,
    dir: Direction,
    key: FlowKey,
}

/// Counts frames into one device's buckets and totals (and the flow table, if given),
/// for one drain: what it borrows of the device, and the shortcut's memory.
struct Counting<'a, 'f> {
    clock: &'a dyn Clocks,
    /// The wall clock bounds the packets' own stamps (a stamp from the future after a
    /// clock step counts now). Read again whenever a frame is stamped later than the
    /// last reading, so no frame is ever pulled back across an interval edge.
    now: i64,
    ports: &'a [u16],
    device_key: [u8; 16],
    buckets: &'a mut Bucketing,
    total: &'a mut Counters,
    flows: Option<&'a mut FlowTable<'f>>,
    /// The last connection seen in the commonest layout, and what the general path made
    /// of it: the next packet of the same connection (a bulk transfer sends long runs of
    /// them) reuses its direction and flow key without parsing its addresses. What it
    /// reuses depends only on the connection bytes, the packet type and the direction
    /// rule, all compared, and on the device and ports, fixed for this drain.
    last: Option<LastFlow>,
}

impl Counting<'_, '_> {
    fn count(&mut self, f: &Frame<'_>, link: LinkLayer, by_ports: bool) {
        if f.sec as i64 > self.now {
            self.now = self.clock.wall_s();
        }
        let flows_on = self.flows.is_some();
        let plain = if flows_on && link == LinkLayer::Ethernet { packet::plain_ipv4(f.data) } else { None };
        let hit = match (&plain, &self.last) {
            (Some((conn, _)), Some(l)) => l.conn == *conn && l.pkttype == f.pkttype && l.by_ports == by_ports,
            _ => false,
        };
        // The key and TCP fields of a frame outside the shortcut's layout.
        let mut other = None;
        let dir = match (hit, &self.last) {
            (true, Some(l)) => l.dir,
            _ => {
                // Off loopback the kernel's packet type is the direction, so without
                // flows only loopback pays for parsing.
                let meta = if by_ports || flows_on { packet::parse(f.data, link, f.protocol).ok() } else { None };
                let Some(dir) = classify(by_ports, f.pkttype, meta.as_ref(), self.ports) else { return };
                if let (true, Some(m)) = (flows_on, meta) {
                    let key = FlowKey::of(self.device_key, dir, &m, self.ports);
                    match plain {
                        Some((conn, _)) => self.last = Some(LastFlow { conn, pkttype: f.pkttype, by_ports, dir, key }),
                        None => other = Some((key, m.tcp)),
                    }
                }
                dir
            }
        };
        self.buckets.record(f.sec as i64, self.now, dir, f.len as u64);
        self.total.add(dir, f.len as u64);
        // The key is read where it lies (no copy): in `last` for the shortcut's layout.
        let (Some(t), Some((key, tcp))) = (
            self.flows.as_deref_mut(),
            match (&plain, &self.last, &other) {
                (Some((_, tcp)), Some(l), _) => Some((&l.key, Some(tcp))),
                (None, _, Some((key, tcp))) => Some((key, tcp.as_ref())),
                _ => None,
            },
        ) else {
            return;
        };
        let clock =
            FlowClock { ts_us: f.sec as i64 * 1_000_000 + f.nsec as i64 / 1000, interval_secs: self.buckets.secs() };
        let ev = t.record(key, dir, tcp, f.len, clock);
        if !ev.is_empty() {
            self.buckets.record_tcp(f.sec as i64, self.now, ev);
        }
    }
}

impl<S: CaptureSource> Device<S> {
    /// Reads at most `max_blocks` blocks from each of the device's sources: the one being
    /// replaced first (what it stamped before the cut), then the current one, then what
    /// both held around the cut once the handover can decide. Returns the blocks read,
    /// the current source's failure, and a resolved handover to report.
    pub(super) fn drain_into(
        &mut self,
        clock: &dyn Clocks,
        ports: &[u16],
        flows: Option<&mut FlowTable<'_>>,
        max_blocks: u32,
    ) -> (u32, Option<CaptureError>, Option<Event>) {
        let device_key = device_bytes(&self.name);
        let Device { source, retiring, info, buckets, total, more, kernel, .. } = self;
        let Some(info) = info.as_ref() else {
            return (0, None, None);
        };
        let mut c = Counting { clock, now: clock.wall_s(), ports, device_key, buckets, total, flows, last: None };
        let mut blocks = 0;
        if let Some(old) = retiring.as_mut() {
            blocks += drain_replaced(old, info, max_blocks, &mut c);
        }
        *more = false;
        let mut dropped = 0;
        let mut failure = None;
        if let Some(r) = source.as_mut() {
            let hand = retiring.as_mut().map(|o| &mut o.handover);
            match drain_current(r, hand, info, max_blocks, &mut c) {
                Ok(st) => {
                    blocks += st.blocks;
                    *more = st.more;
                    // The kernel flags blocks written after it had to drop: learn how
                    // many now, so they are charged to the interval they happened in.
                    if st.losing {
                        if let Ok(k) = r.read_kernel_stats() {
                            dropped = kernel.observe(k.dropped, k.freezes);
                        }
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        let resolved = retiring.as_mut().and_then(|old| resolve_handover(old, &mut c));
        c.buckets.record_drops(clock.wall_s(), dropped);
        (blocks, failure, resolved)
    }
}

/// The replaced source: what it stamped before the cut counts, what it stamped around
/// the cut waits for the handover, the rest is the new source's. Returns blocks read.
fn drain_replaced<S: CaptureSource>(
    old: &mut Retiring<S>,
    info: &DeviceInfo,
    max_blocks: u32,
    c: &mut Counting,
) -> u32 {
    let (link, by_ports) = (old.source.link(), old.source.direction_by_ports(info));
    let Retiring { source, handover: h, .. } = old;
    let drained = source.drain_blocks(max_blocks, |f| match h.old_fate(handover::ts_ns(f)) {
        Fate::Count => c.count(f, link, by_ports),
        Fate::Hold => h.hold_old(handover::hold(f, link, by_ports)),
        Fate::Ignore => {}
    });
    match drained {
        Ok(st) => st.blocks,
        // The old source is on its way out; the new one carries on.
        Err(_) => {
            old.closing = true;
            0
        }
    }
}

/// The current source; while a replaced one hands over, what it stamped around the cut
/// waits for the handover and what it stamped before is the old source's.
fn drain_current<S: CaptureSource>(
    r: &mut S,
    mut hand: Option<&mut Handover<HeldFrame>>,
    info: &DeviceInfo,
    max_blocks: u32,
    c: &mut Counting,
) -> Result<DrainStats, CaptureError> {
    let (link, by_ports) = (r.link(), r.direction_by_ports(info));
    r.drain_blocks(max_blocks, |f| {
        let fate = hand.as_deref_mut().map_or(Fate::Count, |h| h.new_fate(handover::ts_ns(f)));
        match (fate, hand.as_deref_mut()) {
            (Fate::Count, _) => c.count(f, link, by_ports),
            (Fate::Hold, Some(h)) => h.hold_new(handover::hold(f, link, by_ports)),
            _ => {}
        }
    })
}

/// Once both sources have handed over everything in the window around the cut (or the
/// old one is closing), what they held is counted: oldest first, twins once, before
/// anything newer. Returns the handover's figures to report, once.
fn resolve_handover<S>(old: &mut Retiring<S>, c: &mut Counting) -> Option<Event> {
    if !(old.handover.ready() || (old.closing && !old.handover.resolved())) {
        return None;
    }
    let held = old.handover.resolve();
    for h in &held {
        c.count(&h.frame.frame(), h.frame.link, h.frame.by_ports);
    }
    let (held_old, held_new, in_window, twins) = old.handover.stats;
    Some(Event::Handover { held_old, held_new, in_window, twins })
}
