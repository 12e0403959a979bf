//! One captured device, free of PostgreSQL: its capture source (and the one being
//! replaced after a settings change), its state (capturing, down, missing, ...), retries
//! with back-off, health checks, the drain into interval buckets and the flow table, and
//! its running totals. What it needs from outside — looking devices up, opening sources,
//! the clocks, the log — comes through `Env`, and the flows lock through `FlowLock`, so
//! the unit tests below drive it with a fake source and a clock they move by hand.
//! The drain itself, the one path every packet takes, is `drain`.

mod drain;

use crate::capture::filter::LinkLayer;
use crate::capture::{
    classify, packet, CaptureError, CaptureMethod, CaptureSettings, DeviceInfo, Direction, DrainStats, Frame,
    KernelStats,
};
use crate::counters::Counters;
use crate::flows::{device_bytes, Clock as FlowClock, FlowKey, FlowTable};
use crate::handover::{self, Fate, Handover, HeldFrame};
use crate::kernel_counters::KernelCounters;
use crate::stats::Bucketing;
use std::io;
use std::time::{Duration, Instant};

pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// How long a replaced source stays open after its retire timeout, so everything it
/// stamped before the cut has been handed over.
const RETIRE_GRACE: Duration = Duration::from_millis(250);

/// Where capture on one device stands; shown by `pg_netstat_devices`.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum DeviceState {
    #[default]
    Starting = 0,
    Capturing = 1,
    Down = 2,
    Missing = 3,
    NoPermission = 4,
    Error = 5,
    /// No worker is running: between a worker's exit and the next one's start.
    Stopped = 6,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Starting => "starting",
            DeviceState::Capturing => "capturing",
            DeviceState::Down => "down",
            DeviceState::Missing => "missing",
            DeviceState::NoPermission => "no_permission",
            DeviceState::Error => "error",
            DeviceState::Stopped => "stopped",
        }
    }
}

/// What a capture backend offers a device (`capture::source::Source` in the server).
pub trait CaptureSource {
    fn drain_blocks(&mut self, max_blocks: u32, on_frame: impl FnMut(&Frame<'_>)) -> Result<DrainStats, CaptureError>;
    fn blocks_per_lap(&self) -> u32;
    fn read_kernel_stats(&mut self) -> io::Result<KernelStats>;
    /// Takes a pending socket error (device down or gone).
    fn take_error(&self) -> io::Result<Option<io::Error>>;
    fn link(&self) -> LinkLayer;
    fn direction_by_ports(&self, device: &DeviceInfo) -> bool;
    /// The longest the kernel may hold a packet before handing it over.
    fn retire_ms(&self) -> u32;
    fn describe(&self) -> String;
}

/// What happened, for the log; the device has already acted on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The state or its message changed (reported once per change, not per retry).
    State {
        state: DeviceState,
        error: String,
    },
    Opened {
        describe: String,
    },
    Rebuilt {
        describe: String,
    },
    RebuildFailed {
        error: String,
    },
    LookupFailed {
        error: String,
    },
    /// A ring handover resolved: frames held by the old and the new ring, how many of
    /// those were in the window around the cut, and how many were twins.
    Handover {
        held_old: usize,
        held_new: usize,
        in_window: usize,
        twins: usize,
    },
}

/// The device's surroundings: device lookups, capture sources, clocks and the log.
pub trait Env {
    type Source: CaptureSource;
    fn lookup(&mut self, name: &str) -> io::Result<Option<DeviceInfo>>;
    fn open(
        &mut self,
        method: CaptureMethod,
        info: &DeviceInfo,
        ports: &[u16],
        settings: CaptureSettings,
    ) -> Result<Self::Source, CaptureError>;
    fn report(&mut self, device: &str, event: Event);
    fn clock(&self) -> &dyn Clocks;
}

pub trait Clocks {
    /// Wall clock, Unix nanoseconds.
    fn wall_ns(&self) -> u64;
    fn mono(&self) -> Instant;
    fn wall_s(&self) -> i64 {
        (self.wall_ns() / 1_000_000_000) as i64
    }
}

/// The flow table behind its lock, taken once per ring block.
pub trait FlowLock {
    fn enabled(&self) -> bool;
    fn with<R>(&mut self, f: impl FnOnce(&mut FlowTable<'_>) -> R) -> Option<R>;
}

/// The source being replaced after a settings change. Until it is closed, both sources
/// see every packet; `handover` decides which of them counts each one (handover.rs).
pub struct Retiring<S> {
    pub source: S,
    handover: Handover<HeldFrame>,
    pub close_at: Instant,
    /// Being closed: resolve the handover with what both sources have handed over.
    closing: bool,
}

pub struct Device<S> {
    pub name: String,
    info: Option<DeviceInfo>,
    pub source: Option<S>,
    pub retiring: Option<Retiring<S>>,
    /// The last drain stopped at its bound with packets waiting.
    pub more: bool,
    pub buckets: Bucketing,
    pub state: DeviceState,
    pub error: String,
    pub retry_at: Instant,
    backoff: Duration,
    /// Kernel drops and ring freezes, across every source this device has had.
    pub kernel: KernelCounters,
    pub total: Counters,
    /// State or error changed and is not yet in shared memory. (Totals are published
    /// with each closed interval, so the hot path never takes the lock.)
    pub dirty: bool,
}

impl<S: CaptureSource> Device<S> {
    pub fn new(name: String, buckets: Bucketing, now: Instant) -> Device<S> {
        Device {
            name,
            info: None,
            source: None,
            retiring: None,
            more: false,
            buckets,
            state: DeviceState::Starting,
            error: String::new(),
            retry_at: now,
            backoff: RETRY_FIRST,
            kernel: KernelCounters::default(),
            total: Counters::default(),
            dirty: true,
        }
    }

    /// Records a new state; reports only when the state or the message changes, so a
    /// device that keeps failing the same way is reported once.
    fn set_state(&mut self, env: &mut impl Env<Source = S>, state: DeviceState, error: String) {
        if state == self.state && error == self.error {
            return;
        }
        env.report(&self.name, Event::State { state, error: error.clone() });
        self.state = state;
        self.error = error;
        self.dirty = true;
    }

    /// Learns the current source's kernel counters and charges the new drops to the
    /// interval open at `now` (Unix seconds).
    pub fn observe_kernel(&mut self, now: i64) {
        if let Some(r) = self.source.as_mut() {
            if let Ok(st) = r.read_kernel_stats() {
                let new = self.kernel.observe(st.dropped, st.freezes);
                self.buckets.record_drops(now, new);
            }
        }
    }

    /// Takes the current source away (replaced, or failed), keeping what it reported.
    fn take_source(&mut self, now: i64) -> Option<S> {
        self.observe_kernel(now);
        self.kernel.source_replaced();
        self.source.take()
    }

    /// Closes the source being replaced. Its drops up to the cut were charged when it was
    /// replaced; any it reports since are of packets that arrived after the cut, which
    /// the new source (bound before the cut, on the same device and filter) saw too and
    /// either counted or dropped and reported itself: charging them again over-counted.
    fn close_retiring(&mut self) {
        self.retiring = None;
    }

    fn fail(&mut self, env: &mut impl Env<Source = S>, state: DeviceState, error: String) {
        let now = env.clock().wall_s();
        self.take_source(now);
        self.close_retiring();
        self.set_state(env, state, error);
        let delay = if state == DeviceState::NoPermission { RETRY_MAX } else { self.backoff };
        self.retry_at = env.clock().mono() + delay;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    /// Opens the device if it is not capturing and its retry is due; true when a source
    /// was opened.
    pub fn open_if_due(
        &mut self,
        env: &mut impl Env<Source = S>,
        ports: &[u16],
        m: CaptureMethod,
        s: CaptureSettings,
    ) -> bool {
        if self.source.is_some() || self.retry_at > env.clock().mono() {
            return false;
        }
        self.open(env, ports, m, s);
        self.source.is_some()
    }

    fn open(
        &mut self,
        env: &mut impl Env<Source = S>,
        ports: &[u16],
        method: CaptureMethod,
        settings: CaptureSettings,
    ) {
        let info = match env.lookup(&self.name) {
            Ok(Some(i)) => i,
            Ok(None) => return self.fail(env, DeviceState::Missing, "no such device".into()),
            Err(e) => return self.fail(env, DeviceState::Error, format!("device lookup failed: {e}")),
        };
        match env.open(method, &info, ports, settings) {
            Ok(source) => {
                env.report(&self.name, Event::Opened { describe: source.describe() });
                self.take_source(env.clock().wall_s());
                self.source = Some(source);
                self.backoff = RETRY_FIRST;
                let state = if info.up { DeviceState::Capturing } else { DeviceState::Down };
                self.info = Some(info);
                self.set_state(env, state, String::new());
            }
            Err(CaptureError::Permission(e)) => {
                self.fail(env, DeviceState::NoPermission, format!("{e} ({})", crate::capture::PRIVILEGE_MISSING))
            }
            Err(CaptureError::NoSuchDevice(_)) => self.fail(env, DeviceState::Missing, "no such device".into()),
            Err(e) => self.fail(env, DeviceState::Error, e.to_string()),
        }
    }

    /// Follows the device: down/up, gone, or re-created under the same name.
    pub fn health_check(
        &mut self,
        env: &mut impl Env<Source = S>,
        ports: &[u16],
        m: CaptureMethod,
        s: CaptureSettings,
    ) {
        if self.source.is_none() {
            return;
        }
        match env.lookup(&self.name) {
            Ok(None) => self.fail(env, DeviceState::Missing, "device removed".into()),
            Ok(Some(now)) => {
                if self.info.as_ref().map(|i| i.ifindex) != Some(now.ifindex) {
                    // Same name, new device: the old socket is bound to a dead ifindex.
                    self.take_source(env.clock().wall_s());
                    self.open(env, ports, m, s);
                } else {
                    let state = if now.up { DeviceState::Capturing } else { DeviceState::Down };
                    self.set_state(env, state, String::new());
                    self.info = Some(now);
                }
            }
            Err(e) => env.report(&self.name, Event::LookupFailed { error: e.to_string() }),
        }
    }

    /// Reads what the kernel has handed over: one block per hold of the flows lock
    /// (bounded work: a login waits for at most one block), at most one lap per call so
    /// a flood cannot starve the rest of the loop. Returns the blocks read.
    pub fn drain(&mut self, env: &mut impl Env<Source = S>, flows: &mut impl FlowLock, ports: &[u16]) -> u32 {
        let lap = self
            .source
            .iter()
            .chain(self.retiring.as_ref().map(|o| &o.source))
            .map(CaptureSource::blocks_per_lap)
            .sum::<u32>();
        let (blocks, failure, handover) = if !flows.enabled() {
            self.drain_into(env.clock(), ports, None, lap)
        } else {
            let (mut blocks, mut failure, mut handover) = (0, None, None);
            while blocks < lap.max(1) && failure.is_none() {
                let Some((n, f, h)) = flows.with(|t| self.drain_into(env.clock(), ports, Some(t), 1)) else { break };
                (blocks, failure, handover) = (blocks + n, f, h.or(handover));
                if n == 0 {
                    break;
                }
            }
            (blocks, failure, handover)
        };
        if let Some(e) = handover {
            env.report(&self.name, e);
        }
        if let Some(e) = failure {
            match e {
                CaptureError::DeviceDown(_) => self.fail(env, DeviceState::Down, String::new()),
                CaptureError::NoSuchDevice(_) => self.fail(env, DeviceState::Missing, "device removed".into()),
                e => self.fail(env, DeviceState::Error, e.to_string()),
            }
        }
        blocks
    }

    /// Closes the replaced source once everything it stamped before the cut has had
    /// time to be handed over (or now, with `force`). Returns true when a source went.
    pub fn retire_due(
        &mut self,
        env: &mut impl Env<Source = S>,
        flows: &mut impl FlowLock,
        ports: &[u16],
        force: bool,
    ) -> bool {
        match self.retiring.as_mut() {
            Some(old) if force || env.clock().mono() >= old.close_at => {
                old.closing = true;
                self.drain(env, flows, ports);
                self.close_retiring();
                true
            }
            _ => false,
        }
    }

    /// Applies new source settings: the new source is bound before the old one is
    /// closed. When the new one cannot be had, the old one simply goes on, its counters
    /// untouched.
    pub fn rebuild(
        &mut self,
        env: &mut impl Env<Source = S>,
        flows: &mut impl FlowLock,
        ports: &[u16],
        method: CaptureMethod,
        settings: CaptureSettings,
    ) {
        self.retire_due(env, flows, ports, true);
        if self.source.is_none() {
            // Not capturing (missing, no permission...): just try again with the new settings.
            self.retry_at = env.clock().mono();
            return;
        }
        let Ok(Some(info)) = env.lookup(&self.name) else {
            return; // the health check will deal with the device
        };
        match env.open(method, &info, ports, settings) {
            Ok(new) => {
                env.report(&self.name, Event::Rebuilt { describe: new.describe() });
                let now_ns = env.clock().wall_ns();
                self.observe_kernel((now_ns / 1_000_000_000) as i64);
                let Some(old) = self.take_source((now_ns / 1_000_000_000) as i64) else { return };
                let grace = Duration::from_millis(old.retire_ms() as u64) + RETIRE_GRACE;
                self.retiring = Some(Retiring {
                    source: old,
                    handover: Handover::new(now_ns),
                    close_at: env.clock().mono() + grace,
                    closing: false,
                });
                self.source = Some(new);
                self.info = Some(info);
            }
            // Keep counting with the old settings rather than not at all.
            Err(e) => env.report(&self.name, Event::RebuildFailed { error: e.to_string() }),
        }
    }

    /// A readable socket with no block for us: take the pending error so the socket
    /// stops polling ready, and learn from it.
    pub fn check_socket_error(&mut self, env: &mut impl Env<Source = S>) {
        let Some(source) = self.source.as_ref() else { return };
        match source.take_error() {
            Ok(None) => {}
            Ok(Some(e)) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                self.set_state(env, DeviceState::Down, String::new());
            }
            Ok(Some(e)) if matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO)) => {
                self.fail(env, DeviceState::Missing, "device removed".into());
            }
            Ok(Some(e)) | Err(e) => self.fail(env, DeviceState::Error, format!("socket error: {e}")),
        }
    }
}

/// The real capture backends are what a device drains.
impl CaptureSource for crate::capture::source::Source {
    fn drain_blocks(&mut self, max_blocks: u32, on_frame: impl FnMut(&Frame<'_>)) -> Result<DrainStats, CaptureError> {
        crate::capture::source::Source::drain_blocks(self, max_blocks, on_frame)
    }
    fn blocks_per_lap(&self) -> u32 {
        crate::capture::source::Source::blocks_per_lap(self)
    }
    fn read_kernel_stats(&mut self) -> io::Result<KernelStats> {
        crate::capture::source::Source::read_kernel_stats(self)
    }
    fn take_error(&self) -> io::Result<Option<io::Error>> {
        crate::capture::source::Source::take_error(self)
    }
    fn link(&self) -> LinkLayer {
        crate::capture::source::Source::link(self)
    }
    fn direction_by_ports(&self, device: &DeviceInfo) -> bool {
        crate::capture::source::Source::direction_by_ports(self, device)
    }
    fn retire_ms(&self) -> u32 {
        crate::capture::source::Source::retire_ms(self)
    }
    fn describe(&self) -> String {
        crate::capture::source::Source::describe(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::filter::{PACKET_HOST, PACKET_OUTGOING};
    use crate::capture::testframes::eth_ipv4_tcp;
    use crate::flows::Storage;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::rc::Rc;

    const T0_NS: u64 = 1_800_000_000 * 1_000_000_000;

    #[derive(Clone)]
    struct TestFrame {
        ts_ns: u64,
        pkttype: u8,
        data: Vec<u8>,
    }

    /// What a fake source delivers and reports; shared with the test that feeds it.
    #[derive(Default)]
    struct Wire {
        blocks: VecDeque<Vec<TestFrame>>,
        stats: KernelStats,
        losing: bool,
        socket_error: Option<i32>,
    }

    struct FakeSource(Rc<RefCell<Wire>>);

    impl CaptureSource for FakeSource {
        fn drain_blocks(&mut self, max: u32, mut on_frame: impl FnMut(&Frame<'_>)) -> Result<DrainStats, CaptureError> {
            let mut w = self.0.borrow_mut();
            let mut st = DrainStats::default();
            while st.blocks < max {
                let Some(block) = w.blocks.pop_front() else { break };
                for f in &block {
                    on_frame(&Frame {
                        sec: (f.ts_ns / 1_000_000_000) as u32,
                        nsec: (f.ts_ns % 1_000_000_000) as u32,
                        len: f.data.len() as u32,
                        data: &f.data,
                        pkttype: f.pkttype,
                        protocol: 0x0800,
                        vlan_tci: None,
                    });
                    st.frames += 1;
                }
                st.blocks += 1;
                st.losing |= std::mem::take(&mut w.losing);
            }
            st.more = !w.blocks.is_empty();
            Ok(st)
        }
        fn blocks_per_lap(&self) -> u32 {
            4
        }
        fn read_kernel_stats(&mut self) -> io::Result<KernelStats> {
            Ok(self.0.borrow().stats)
        }
        fn take_error(&self) -> io::Result<Option<io::Error>> {
            Ok(self.0.borrow_mut().socket_error.take().map(io::Error::from_raw_os_error))
        }
        fn link(&self) -> LinkLayer {
            LinkLayer::Ethernet
        }
        fn direction_by_ports(&self, device: &DeviceInfo) -> bool {
            device.loopback
        }
        fn retire_ms(&self) -> u32 {
            100
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    /// A world the test controls: which devices exist, whether opening works, the clocks.
    struct World {
        devices: Vec<DeviceInfo>,
        open_fails: Option<fn() -> CaptureError>,
        wires: Vec<Rc<RefCell<Wire>>>,
        events: Vec<Event>,
        wall_ns: Cell<u64>,
        base: Instant,
        elapsed: Cell<Duration>,
    }

    impl World {
        fn new() -> World {
            World {
                devices: vec![],
                open_fails: None,
                wires: vec![],
                events: vec![],
                wall_ns: Cell::new(T0_NS),
                base: Instant::now(),
                elapsed: Cell::new(Duration::ZERO),
            }
        }
        fn advance(&self, d: Duration) {
            self.elapsed.set(self.elapsed.get() + d);
            self.wall_ns.set(self.wall_ns.get() + d.as_nanos() as u64);
        }
        fn eth0(&mut self, ifindex: u32, up: bool) {
            self.devices.retain(|d| d.name != "eth0");
            let (name, loopback, link, mac) = ("eth0".into(), false, LinkLayer::Ethernet, None);
            self.devices.push(DeviceInfo { name, ifindex, up, loopback, link, mac });
        }
        fn wire(&self) -> Rc<RefCell<Wire>> {
            self.wires.last().expect("a source was opened").clone()
        }
        fn states(&self) -> Vec<DeviceState> {
            self.events
                .iter()
                .filter_map(|e| if let Event::State { state, .. } = e { Some(*state) } else { None })
                .collect()
        }
    }

    impl Clocks for World {
        fn wall_ns(&self) -> u64 {
            self.wall_ns.get()
        }
        fn mono(&self) -> Instant {
            self.base + self.elapsed.get()
        }
    }

    impl Env for World {
        type Source = FakeSource;
        fn lookup(&mut self, name: &str) -> io::Result<Option<DeviceInfo>> {
            Ok(self.devices.iter().find(|d| d.name == name).cloned())
        }
        fn open(
            &mut self,
            _: CaptureMethod,
            _: &DeviceInfo,
            _: &[u16],
            _: CaptureSettings,
        ) -> Result<FakeSource, CaptureError> {
            if let Some(e) = self.open_fails {
                return Err(e());
            }
            self.wires.push(Rc::new(RefCell::new(Wire::default())));
            Ok(FakeSource(self.wire()))
        }
        fn report(&mut self, _: &str, event: Event) {
            self.events.push(event);
        }
        fn clock(&self) -> &dyn Clocks {
            self
        }
    }

    struct NoFlows;
    impl FlowLock for NoFlows {
        fn enabled(&self) -> bool {
            false
        }
        fn with<R>(&mut self, _: impl FnOnce(&mut FlowTable<'_>) -> R) -> Option<R> {
            None
        }
    }

    struct Flows(Storage);
    impl FlowLock for Flows {
        fn enabled(&self) -> bool {
            true
        }
        fn with<R>(&mut self, f: impl FnOnce(&mut FlowTable<'_>) -> R) -> Option<R> {
            Some(f(&mut self.0.table()))
        }
    }

    const SETTINGS: CaptureSettings = CaptureSettings { buffer_size: 1 << 20, snaplen: 96, timeout_ms: 100 };
    const PORTS: &[u16] = &[5432];

    fn device(w: &World) -> Device<FakeSource> {
        Device::new("eth0".into(), Bucketing::new(1, 2, w.wall_s()), w.mono())
    }

    fn frames(w: &World, n: u64, pkttype: u8) -> Vec<TestFrame> {
        (0..n).map(|i| TestFrame { ts_ns: w.wall_ns() + i, pkttype, data: eth_ipv4_tcp(40000, 5432, 0) }).collect()
    }

    fn open(d: &mut Device<FakeSource>, w: &mut World) -> bool {
        d.open_if_due(w, PORTS, CaptureMethod::Auto, SETTINGS)
    }

    #[test]
    fn a_missing_device_is_retried_later_and_later_then_captured_once_it_appears() {
        let mut w = World::new();
        let mut d = device(&w);
        assert!(!open(&mut d, &mut w));
        assert_eq!(d.state, DeviceState::Missing);
        let mut delays = vec![];
        for _ in 0..8 {
            let mut waited = Duration::ZERO;
            while d.retry_at > w.mono() {
                let due = d.retry_at;
                assert!(!open(&mut d, &mut w));
                assert_eq!(d.retry_at, due, "no attempt before the retry is due");
                w.advance(Duration::from_millis(500));
                waited += Duration::from_millis(500);
            }
            delays.push(waited.as_secs());
            assert!(!open(&mut d, &mut w), "due: tried again, still missing");
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(w.states(), [DeviceState::Missing], "a failure that repeats is reported once");
        w.eth0(3, true);
        w.advance(RETRY_MAX);
        assert!(open(&mut d, &mut w));
        assert_eq!(d.state, DeviceState::Capturing);
        assert_eq!(w.states(), [DeviceState::Missing, DeviceState::Capturing]);
    }

    #[test]
    fn a_missing_privilege_is_retried_once_a_minute() {
        let mut w = World::new();
        w.eth0(3, true);
        w.open_fails = Some(|| CaptureError::Permission(io::Error::from_raw_os_error(libc::EPERM)));
        let mut d = device(&w);
        assert!(!open(&mut d, &mut w));
        assert_eq!(d.state, DeviceState::NoPermission);
        w.advance(RETRY_MAX - Duration::from_millis(1));
        assert!(!open(&mut d, &mut w), "not before a minute");
        w.open_fails = None;
        w.advance(Duration::from_millis(1));
        assert!(open(&mut d, &mut w));
    }

    #[test]
    fn the_health_check_follows_the_device_down_up_removed_and_recreated() {
        let mut w = World::new();
        w.eth0(3, true);
        let mut d = device(&w);
        assert!(open(&mut d, &mut w));
        w.eth0(3, false);
        d.health_check(&mut w, PORTS, CaptureMethod::Auto, SETTINGS);
        assert_eq!(d.state, DeviceState::Down);
        w.eth0(3, true);
        d.health_check(&mut w, PORTS, CaptureMethod::Auto, SETTINGS);
        assert_eq!(d.state, DeviceState::Capturing);
        // Re-created under the same name: a new ifindex, so a new source.
        w.eth0(9, true);
        d.health_check(&mut w, PORTS, CaptureMethod::Auto, SETTINGS);
        assert_eq!((d.state, w.wires.len()), (DeviceState::Capturing, 2));
        w.devices.clear();
        d.health_check(&mut w, PORTS, CaptureMethod::Auto, SETTINGS);
        assert_eq!((d.state, d.source.is_none()), (DeviceState::Missing, true));
        // A socket error says the same without waiting for the check.
        w.eth0(9, true);
        w.advance(RETRY_MAX);
        assert!(open(&mut d, &mut w));
        w.wire().borrow_mut().socket_error = Some(libc::ENETDOWN);
        d.check_socket_error(&mut w);
        assert_eq!(d.state, DeviceState::Down);
        w.wire().borrow_mut().socket_error = Some(libc::ENODEV);
        d.check_socket_error(&mut w);
        assert_eq!(d.state, DeviceState::Missing);
    }

    #[test]
    fn frames_are_counted_by_their_kernel_direction_into_intervals_and_totals() {
        let mut w = World::new();
        w.eth0(3, true);
        let mut d = device(&w);
        assert!(open(&mut d, &mut w));
        let wire = w.wire();
        wire.borrow_mut().blocks.push_back(frames(&w, 3, PACKET_HOST));
        wire.borrow_mut().blocks.push_back(frames(&w, 2, PACKET_OUTGOING));
        assert_eq!(d.drain(&mut w, &mut NoFlows, PORTS), 2);
        assert_eq!((d.total.packets_in, d.total.packets_out), (3, 2));
        w.advance(Duration::from_secs(4));
        let rows = d.buckets.close_due(w.wall_s());
        let sum: u64 = rows.iter().map(|r| r.counters.packets()).sum();
        assert_eq!(sum, 5);
    }

    #[test]
    fn with_flows_every_block_is_counted_in_the_flow_table_under_its_own_lock_hold() {
        let mut w = World::new();
        w.eth0(3, true);
        let mut d = device(&w);
        assert!(open(&mut d, &mut w));
        for _ in 0..3 {
            w.wire().borrow_mut().blocks.push_back(frames(&w, 4, PACKET_HOST));
        }
        let mut flows = Flows(Storage::new(8, 8));
        assert_eq!(d.drain(&mut w, &mut flows, PORTS), 3);
        let t = flows.0.table();
        assert_eq!(t.header.count, 1);
        assert_eq!(t.flows.iter().find(|f| f.in_use).map(|f| f.total.packets_in), Some(12));
    }

    #[test]
    fn the_same_connection_shortcut_counts_every_flow_and_direction_as_the_general_path() {
        let mut w = World::new();
        w.eth0(3, true);
        let mut d = device(&w);
        assert!(open(&mut d, &mut w));
        // Runs of two connections in one block; the same bytes in both packet types
        // (the direction rule must still see each); frames with IP options (the general
        // path) between runs of the shortcut's layout.
        let pattern: [(u16, u8, usize); 12] = [
            (40000, PACKET_HOST, 0),
            (40000, PACKET_HOST, 0),
            (40000, PACKET_OUTGOING, 0),
            (40000, PACKET_OUTGOING, 0),
            (40001, PACKET_HOST, 0),
            (40000, PACKET_HOST, 0),
            (40000, PACKET_HOST, 8),
            (40000, PACKET_HOST, 0),
            (40001, PACKET_OUTGOING, 0),
            (40001, PACKET_OUTGOING, 8),
            (40001, PACKET_HOST, 0),
            (40000, PACKET_OUTGOING, 0),
        ];
        let block: Vec<TestFrame> = (0..10)
            .flat_map(|_| pattern)
            .enumerate()
            .map(|(i, (port, pkttype, options))| TestFrame {
                ts_ns: w.wall_ns() + i as u64,
                pkttype,
                data: eth_ipv4_tcp(port, 5432, options),
            })
            .collect();
        let want =
            |port: u16, pkttype: u8| 10 * pattern.iter().filter(|p| p.0 == port && p.1 == pkttype).count() as u64;
        w.wire().borrow_mut().blocks.push_back(block);
        let mut flows = Flows(Storage::new(8, 8));
        assert_eq!(d.drain(&mut w, &mut flows, PORTS), 1);
        assert_eq!((d.total.packets_in, d.total.packets_out), (70, 50));
        let t = flows.0.table();
        assert_eq!(t.header.count, 2);
        for port in [40000, 40001] {
            let f = t.flows.iter().find(|f| f.in_use && f.key.client_port == port).expect("flow");
            let c = f.total;
            assert_eq!((c.packets_in, c.packets_out), (want(port, PACKET_HOST), want(port, PACKET_OUTGOING)), "{port}");
            let frame_len = |options| eth_ipv4_tcp(port, 5432, options).len() as u64;
            let bytes: u64 =
                pattern.iter().filter(|p| p.0 == port && p.1 == PACKET_HOST).map(|p| 10 * frame_len(p.2)).sum();
            assert_eq!(c.bytes_in, bytes, "{port}");
        }
    }

    #[test]
    fn kernel_drops_are_charged_once_even_when_a_rebuild_fails() {
        let mut w = World::new();
        w.eth0(3, true);
        let mut d = device(&w);
        assert!(open(&mut d, &mut w));
        let wire = w.wire();
        {
            let mut wi = wire.borrow_mut();
            wi.stats.dropped = 5;
            wi.losing = true;
            wi.blocks.push_back(frames(&w, 1, PACKET_HOST));
        }
        d.drain(&mut w, &mut NoFlows, PORTS);
        // New settings, but the new source cannot be had: the old one goes on.
        w.open_fails =
            Some(|| CaptureError::Io { what: "PACKET_RX_RING", err: io::Error::from_raw_os_error(libc::ENOMEM) });
        d.rebuild(&mut w, &mut NoFlows, PORTS, CaptureMethod::Auto, SETTINGS);
        assert!(matches!(w.events.last(), Some(Event::RebuildFailed { .. })));
        d.observe_kernel(w.wall_s());
        d.observe_kernel(w.wall_s());
        assert_eq!(d.kernel.drops(), 5);
        w.advance(Duration::from_secs(4));
        let charged: u64 = d.buckets.close_due(w.wall_s()).iter().map(|r| r.drops).sum();
        assert_eq!(charged, 5);
    }

    #[test]
    fn drops_after_the_cut_are_the_new_sources_and_charged_once() {
        let mut w = World::new();
        w.eth0(3, true);
        let mut d = device(&w);
        assert!(open(&mut d, &mut w));
        let old = w.wire();
        old.borrow_mut().stats.dropped = 2;
        d.rebuild(&mut w, &mut NoFlows, PORTS, CaptureMethod::Auto, SETTINGS);
        let new = w.wire();
        // A stall after the cut: both sources see the same 7 packets arrive and, full,
        // drop them; the new one counts them.
        old.borrow_mut().stats.dropped = 9;
        {
            let mut n = new.borrow_mut();
            n.stats.dropped = 7;
            n.losing = true;
            n.blocks.push_back(frames(&w, 1, PACKET_HOST));
        }
        w.advance(Duration::from_millis(400));
        d.drain(&mut w, &mut NoFlows, PORTS);
        assert!(d.retire_due(&mut w, &mut NoFlows, PORTS, false));
        d.observe_kernel(w.wall_s());
        assert_eq!(d.kernel.drops(), 2 + 7);
        w.advance(Duration::from_secs(4));
        let charged: u64 = d.buckets.close_due(w.wall_s()).iter().map(|r| r.drops).sum();
        assert_eq!(charged, 2 + 7);
    }

    #[test]
    fn a_rebuild_hands_over_from_the_old_source_to_the_new_without_losing_or_doubling() {
        let mut w = World::new();
        w.eth0(3, true);
        let mut d = device(&w);
        assert!(open(&mut d, &mut w));
        let old = w.wire();
        d.rebuild(&mut w, &mut NoFlows, PORTS, CaptureMethod::Auto, SETTINGS);
        assert_eq!(w.wires.len(), 2);
        let new = w.wire();
        // 4 ms of packets around the cut, one every 10 µs, each seen by both sources,
        // the new one stamping it 3 µs earlier or later by turns; each a distinct packet.
        let cut = w.wall_ns();
        let (mut old_block, mut new_block) = (vec![], vec![]);
        for i in 0..400u64 {
            let ts = cut - 2_000_000 + i * 10_000;
            let data = eth_ipv4_tcp(40000 + i as u16, 5432, 0);
            let skew = if i % 2 == 0 { ts + 3_000 } else { ts - 3_000 };
            old_block.push(TestFrame { ts_ns: ts, pkttype: PACKET_HOST, data: data.clone() });
            new_block.push(TestFrame { ts_ns: skew, pkttype: PACKET_HOST, data });
        }
        // Only what came before the new source was bound reaches the old one alone.
        new_block.retain(|f| f.ts_ns >= cut - 1_000_000);
        old.borrow_mut().blocks.push_back(old_block);
        new.borrow_mut().blocks.push_back(new_block);
        w.advance(Duration::from_millis(5));
        d.drain(&mut w, &mut NoFlows, PORTS);
        w.advance(Duration::from_millis(400));
        assert!(d.retire_due(&mut w, &mut NoFlows, PORTS, false));
        assert_eq!(d.total.packets_in, 400);
        assert!(w.events.iter().any(|e| matches!(e, Event::Handover { twins, .. } if *twins > 0)));
    }
}
