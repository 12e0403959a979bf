//! The capture worker: one process, one thread, one wait on the latch, postmaster death
//! and every ring socket at once. It drains rings as soon as the kernel hands over a
//! block, buckets packets by their own timestamps, and publishes closed intervals.

use crate::capture::source::Source;
use crate::capture::{self, classify, packet, CaptureError, CaptureMethod, CaptureSettings, DeviceInfo, Frame, MAX_DEVICES};
use crate::flows::{device_bytes, Clock, FlowKey, FlowTable, TcpCounters};
use crate::flowshm;
use crate::gucs::Settings;
use crate::privileges;
use crate::shmem::{DeviceState, INJECT_ERROR, STATE};
use crate::stats::{Bucketing, Closed, Counters};
use std::sync::atomic::{AtomicBool, Ordering};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::ffi::c_void;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WORKER_NAME: &str = "pg_netstat collector";
/// How soon PostgreSQL starts the worker again after it exits with an error.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// How often devices are looked at for down/up, removal and re-creation.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
const PG_WAIT_EXTENSION: u32 = 0x0700_0000;
const PGINVALID_SOCKET: pg_sys::pgsocket = -1;

pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type("pg_netstat")
        .set_library("pg_netstat")
        .set_function("pg_netstat_worker_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::PostmasterStart)
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_netstat_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM gets PostgreSQL's own handler: the next CHECK_FOR_INTERRUPTS ends the
    // worker with FATAL (exit code 1), so after pg_terminate_backend() or a kill the
    // postmaster starts it again, while at shutdown it simply stops.
    // SAFETY: installing a signal handler PostgreSQL provides for exactly this.
    unsafe { set_sigterm_to_die() };
    // The postmaster left CAP_NET_RAW permitted only; this is the one process that uses it.
    match privileges::raise_net_raw() {
        Ok(true) => {}
        Ok(false) => {} // reported per device as no_permission when sockets fail
        Err(e) => log!("pg_netstat: could not raise CAP_NET_RAW: {e}"),
    }
    STATE.exclusive().worker_pid = std::process::id() as i32;
    let mut worker = Worker::start();
    worker.run();
}

unsafe extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends. pgrx's `pg_sys::die` is a Rust wrapper
    /// for calling it; a signal handler needs the C function itself.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

#[cfg(not(feature = "pg18"))]
unsafe fn set_sigterm_to_die() {
    unsafe { pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die)) };
}

#[cfg(feature = "pg18")]
unsafe fn set_sigterm_to_die() {
    unsafe { pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(postgres_die)) };
}

/// Set once the missing-privilege warning has been logged, so a worker with several
/// devices says it once, not once per device; cleared when capture works again.
static PERMISSION_REPORTED: AtomicBool = AtomicBool::new(false);

fn wall_now() -> (i64, i64) {
    // Before 1970 only on a badly broken clock; count it as 0 rather than fail.
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.as_micros() as i64)
}

fn log_report(level: PgLogLevel, code: PgSqlErrorCode, message: String, hint: Option<&str>) {
    let mut r = ErrorReport::new(code, message, "pg_netstat worker");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(level);
}

const PERMISSION_HINT: &str = "Packet capture needs CAP_NET_RAW (nothing else). Start the server with it, e.g. \
    setpriv --inh-caps=+net_raw --ambient-caps=+net_raw pg_ctl start ..., or grant it to the binary once with \
    setcap cap_net_raw=ep on the postgres executable. Capture is retried every minute.";

/// The ring being replaced after a settings change. Until it is closed, both rings see
/// every packet: the old one counts those stamped before `split`, the new one the rest,
/// so a rebuild neither loses nor double-counts a packet.
struct RetiringRing {
    ring: Source,
    /// Its kernel drops already charged.
    drops_seen: u64,
    split: (u32, u32),
    close_at: Instant,
}

struct Device {
    name: String,
    info: Option<DeviceInfo>,
    ring: Option<Source>,
    old_ring: Option<RetiringRing>,
    /// The last drain stopped at its bound with packets waiting.
    more: bool,
    buckets: Bucketing,
    state: DeviceState,
    error: String,
    retry_at: Instant,
    backoff: Duration,
    /// Kernel drops already charged to an interval (running total of the current source).
    drops_seen: u64,
    /// Drops of earlier sources of this device (before a rebuild or reopen).
    kernel_drops_total: u64,
    /// Times the current source's ring was full (frozen), and those of earlier sources.
    freezes_seen: u64,
    freezes_total: u64,
    total: Counters,
    /// State or error changed and is not yet in shared memory. (Totals are published
    /// with each closed interval, so the hot path never takes the lock.)
    dirty: bool,
}

impl Device {
    fn new(name: String, s: &Settings, now: i64) -> Device {
        Device {
            name,
            info: None,
            ring: None,
            old_ring: None,
            more: false,
            buckets: Bucketing::new(s.interval, s.packet_wait_time, now),
            state: DeviceState::Starting,
            error: String::new(),
            retry_at: Instant::now(),
            backoff: RETRY_FIRST,
            drops_seen: 0,
            kernel_drops_total: 0,
            freezes_seen: 0,
            freezes_total: 0,
            total: Counters::default(),
            dirty: true,
        }
    }

    /// Records a new state; logs only when the state or the message changes, so a
    /// device that keeps failing the same way is reported once.
    fn set_state(&mut self, state: DeviceState, error: String) {
        if state == self.state && error == self.error {
            return;
        }
        match state {
            DeviceState::Capturing => {
                PERMISSION_REPORTED.store(false, Ordering::Relaxed);
                log!("pg_netstat: capturing on device \"{}\"", self.name);
            }
            DeviceState::NoPermission => {
                if !PERMISSION_REPORTED.swap(true, Ordering::Relaxed) {
                    log_report(
                        PgLogLevel::WARNING,
                        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                        format!("pg_netstat: cannot capture network traffic: {error}"),
                        Some(PERMISSION_HINT),
                    )
                }
            }
            DeviceState::Missing => log_report(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("pg_netstat: network device \"{}\" does not exist", self.name),
                Some("Check pg_netstat.devices (ip link lists the devices). Capture starts when the device appears."),
            ),
            DeviceState::Down => {
                log!("pg_netstat: network device \"{}\" is down; capture resumes when it is up", self.name)
            }
            DeviceState::Error => log_report(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                format!("pg_netstat: capture on device \"{}\" failed: {}", self.name, error),
                Some("Capture is retried with a growing delay."),
            ),
            DeviceState::Starting => {}
        }
        self.state = state;
        self.error = error;
        self.dirty = true;
    }

    /// Charges drops the current source reported since last asked, then makes its count
    /// part of the device total, before the source is replaced or dropped.
    /// Returns the source's running drop count at this point.
    fn retire_source_stats(&mut self) -> u64 {
        let (now, _) = wall_now();
        if let Some(r) = self.ring.as_mut() {
            if let Ok(st) = r.read_kernel_stats() {
                self.buckets.record_drops(now, st.dropped.saturating_sub(self.drops_seen));
                self.drops_seen = st.dropped;
                self.freezes_seen = st.freezes;
            }
        }
        let seen = self.drops_seen;
        self.kernel_drops_total += seen;
        self.drops_seen = 0;
        self.freezes_total += self.freezes_seen;
        self.freezes_seen = 0;
        seen
    }

    fn fail(&mut self, state: DeviceState, error: String) {
        let _ = self.retire_source_stats();
        self.ring = None;
        self.old_ring = None;
        self.set_state(state, error);
        let delay = if state == DeviceState::NoPermission { RETRY_MAX } else { self.backoff };
        self.retry_at = Instant::now() + delay;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    fn open(&mut self, ports: &[u16], method: CaptureMethod, settings: CaptureSettings) {
        let info = match capture::device_info(&self.name) {
            Ok(Some(i)) => i,
            Ok(None) => return self.fail(DeviceState::Missing, "no such device".into()),
            Err(e) => return self.fail(DeviceState::Error, format!("device lookup failed: {e}")),
        };
        match Source::open(method, &info, ports, settings) {
            Ok(ring) => {
                log!("pg_netstat: device \"{}\": {}", self.name, ring.describe());
                let _ = self.retire_source_stats();
                self.ring = Some(ring);
                self.backoff = RETRY_FIRST;
                let state = if info.up { DeviceState::Capturing } else { DeviceState::Down };
                self.info = Some(info);
                self.set_state(state, String::new());
            }
            Err(CaptureError::Permission(e)) => self.fail(DeviceState::NoPermission, format!("{e} (CAP_NET_RAW missing)")),
            Err(CaptureError::NoSuchDevice(_)) => self.fail(DeviceState::Missing, "no such device".into()),
            Err(e) => self.fail(DeviceState::Error, e.to_string()),
        }
    }

    /// Follows the device: down/up, gone, or re-created under the same name.
    fn health_check(&mut self, ports: &[u16], method: CaptureMethod, settings: CaptureSettings) {
        if self.ring.is_none() {
            return;
        }
        match capture::device_info(&self.name) {
            Ok(None) => self.fail(DeviceState::Missing, "device removed".into()),
            Ok(Some(now)) => {
                let before = self.info.as_ref().map(|i| i.ifindex);
                if before != Some(now.ifindex) {
                    // Same name, new device: the old socket is bound to a dead ifindex.
                    self.ring = None;
                    self.open(ports, method, settings);
                } else {
                    let state = if now.up { DeviceState::Capturing } else { DeviceState::Down };
                    self.set_state(state, String::new());
                    self.info = Some(now);
                }
            }
            Err(e) => log!("pg_netstat: cannot look at device \"{}\": {e}", self.name),
        }
    }

    fn drain(&mut self, ports: &[u16]) -> u32 {
        if flowshm::enabled() {
            // One lock per drain (at most one lap of the ring), not per packet.
            flowshm::with_table(true, |t| self.drain_into(ports, Some(t))).unwrap_or(0)
        } else {
            self.drain_into(ports, None)
        }
    }

    fn drain_into(&mut self, ports: &[u16], mut flows: Option<&mut FlowTable<'_>>) -> u32 {
        let (now, _) = wall_now();
        let device_key = device_bytes(&self.name);
        let Device { ring, old_ring, info, buckets, total, more, drops_seen, .. } = self;
        let Some(info) = info.as_ref() else {
            return 0;
        };
        let interval_secs = buckets.secs();
        let mut count = |f: &Frame<'_>, link, by_ports: bool| {
            // Off loopback the kernel's packet type is the direction, so without flows
            // only loopback pays for parsing.
            let meta = if by_ports || flows.is_some() { packet::parse(f.data, link, f.protocol).ok() } else { None };
            if let Some(dir) = classify(by_ports, f.pkttype, meta.as_ref(), ports) {
                buckets.record(f.sec as i64, now, dir, f.len as u64);
                total.add(dir, f.len as u64);
                if let (Some(t), Some(m)) = (flows.as_deref_mut(), meta.as_ref()) {
                    let clock = Clock { ts_us: f.sec as i64 * 1_000_000 + f.nsec as i64 / 1000, interval_secs };
                    let ev = t.record(&FlowKey::of(device_key, dir, m, ports), dir, m.tcp.as_ref(), f.len, clock);
                    if ev != TcpCounters::default() {
                        buckets.record_tcp(f.sec as i64, now, &ev);
                    }
                }
            }
        };
        let mut blocks = 0;
        let mut failure = None;
        let split = old_ring.as_ref().map(|o| o.split);
        if let Some(old) = old_ring.as_mut() {
            let (link, by_ports) = (old.ring.link(), old.ring.direction_by_ports(info));
            match old.ring.drain(|f| if (f.sec, f.nsec) < old.split { count(f, link, by_ports) }) {
                Ok(st) => blocks += st.blocks,
                // The old ring is on its way out; the new one carries on.
                Err(_) => *old_ring = None,
            }
        }
        *more = false;
        if let Some(r) = ring.as_mut() {
            let (link, by_ports) = (r.link(), r.direction_by_ports(info));
            match r.drain(|f| if split.is_none_or(|s| (f.sec, f.nsec) >= s) { count(f, link, by_ports) }) {
                Ok(st) => {
                    blocks += st.blocks;
                    *more = st.more;
                    // The kernel flags blocks written after it had to drop: learn how
                    // many now, so they are charged to the interval they happened in.
                    if st.losing {
                        if let Ok(k) = r.read_kernel_stats() {
                            buckets.record_drops(now, k.dropped.saturating_sub(*drops_seen));
                            *drops_seen = k.dropped;
                        }
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            match e {
                CaptureError::DeviceDown(_) => self.fail(DeviceState::Down, String::new()),
                CaptureError::NoSuchDevice(_) => self.fail(DeviceState::Missing, "device removed".into()),
                e => self.fail(DeviceState::Error, e.to_string()),
            }
        }
        blocks
    }

    /// Closes the replaced ring once every packet stamped before the split has had time
    /// to be handed over. Returns true when a socket went away.
    fn retire_old_ring(&mut self, ports: &[u16], force: bool) -> bool {
        match &self.old_ring {
            Some(old) if force || Instant::now() >= old.close_at => {
                self.drain(ports);
                if let Some(mut old) = self.old_ring.take() {
                    // Its count was reset when it was replaced; what it dropped since counts too.
                    if let Ok(st) = old.ring.read_kernel_stats() {
                        let (now, _) = wall_now();
                        let n = st.dropped.saturating_sub(old.drops_seen);
                        self.buckets.record_drops(now, n);
                        self.kernel_drops_total += n;
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Applies new ring settings: the new ring is bound before the old one is closed.
    fn rebuild(&mut self, ports: &[u16], method: CaptureMethod, settings: CaptureSettings) {
        self.retire_old_ring(ports, true);
        let old_seen = if self.ring.is_some() { self.retire_source_stats() } else { 0 };
        let Some(old) = self.ring.take() else {
            // Not capturing (missing, no permission...): just try again with the new settings.
            self.retry_at = Instant::now();
            return;
        };
        let info = match capture::device_info(&self.name) {
            Ok(Some(i)) => i,
            _ => {
                self.ring = Some(old);
                return; // the health check will deal with the device
            }
        };
        match Source::open(method, &info, ports, settings) {
            Ok(new) => {
                log!("pg_netstat: device \"{}\": new settings, {}", self.name, new.describe());
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                let grace = Duration::from_millis(old.retire_ms() as u64) + Duration::from_millis(250);
                self.old_ring = Some(RetiringRing {
                    drops_seen: old_seen,
                    ring: old,
                    split: (now.as_secs() as u32, now.subsec_nanos()),
                    close_at: Instant::now() + grace,
                });
                self.ring = Some(new);
                self.info = Some(info);
            }
            Err(e) => {
                // Keep counting with the old settings rather than not at all.
                self.ring = Some(old);
                log_report(
                    PgLogLevel::WARNING,
                    PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                    format!("pg_netstat: cannot apply the new capture settings on device \"{}\": {e}", self.name),
                    Some("Capture goes on with the previous settings."),
                );
            }
        }
    }

    /// A readable socket with no block for us: take the pending error so the socket
    /// stops polling ready, and learn from it.
    fn check_socket_error(&mut self) {
        let Some(ring) = self.ring.as_ref() else { return };
        match ring.take_error() {
            Ok(None) => {}
            Ok(Some(e)) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                self.set_state(DeviceState::Down, String::new());
            }
            Ok(Some(e)) if matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO)) => {
                self.fail(DeviceState::Missing, "device removed".into());
            }
            Ok(Some(e)) | Err(e) => self.fail(DeviceState::Error, format!("socket error: {e}")),
        }
    }
}

/// Notices wall-clock steps (NTP, an operator) by comparing the wall clock with the
/// monotonic one. Only for the log: the bucketing already copes (see stats.rs).
struct ClockWatch {
    base: Instant,
    offset_ms: i64,
}

impl ClockWatch {
    fn offset_now(&self) -> i64 {
        let (_, wall_us) = wall_now();
        wall_us / 1000 - self.base.elapsed().as_millis() as i64
    }

    fn new() -> ClockWatch {
        let mut w = ClockWatch { base: Instant::now(), offset_ms: 0 };
        w.offset_ms = w.offset_now();
        w
    }

    /// The size of a step since the last call, if the wall clock jumped by over a second.
    fn step(&mut self) -> Option<i64> {
        let now = self.offset_now();
        let step = now - self.offset_ms;
        self.offset_ms = now;
        (step.abs() > 1000).then_some(step)
    }
}

struct Worker {
    server_port: u16,
    clock: ClockWatch,
    settings: Settings,
    ports: Vec<u16>,
    devices: Vec<Device>,
    set: *mut pg_sys::WaitEventSet,
    set_dirty: bool,
    next_health_check: Instant,
    next_flow_upkeep: Instant,
}

fn resolve_devices(s: &Settings) -> Vec<String> {
    let mut names = if s.devices.is_empty() {
        match capture::default_device() {
            Ok(Some(d)) => vec![d],
            Ok(None) => {
                if !s.capture_loopback {
                    warning!("pg_netstat: no network device is up besides loopback; set pg_netstat.devices or pg_netstat.capture_loopback");
                }
                vec![]
            }
            Err(e) => {
                warning!("pg_netstat: cannot list network devices: {e}");
                vec![]
            }
        }
    } else {
        s.devices.clone()
    };
    if s.capture_loopback {
        let lo = capture::list_devices()
            .ok()
            .and_then(|l| l.into_iter().find(|d| d.loopback).map(|d| d.name))
            .unwrap_or_else(|| "lo".to_string());
        if !names.contains(&lo) {
            names.push(lo);
        }
    }
    names.truncate(MAX_DEVICES);
    names
}

fn capture_settings(s: &Settings) -> CaptureSettings {
    CaptureSettings { buffer_size: s.buffer_size, snaplen: s.snaplen, timeout_ms: s.timeout_ms }
}

/// The server's own port first, then the extra ones (deduplicated).
fn all_ports(server_port: u16, s: &Settings) -> Vec<u16> {
    let mut ports = vec![server_port];
    ports.extend(s.ports.iter().copied().filter(|p| *p != server_port));
    ports
}

impl Worker {
    fn start() -> Worker {
        let settings = Settings::current();
        // SAFETY: PostPortNumber is set by the postmaster before any worker starts.
        let port = unsafe { pg_sys::PostPortNumber } as u16;
        let ports = all_ports(port, &settings);
        let mut w = Worker {
            server_port: port,
            clock: ClockWatch::new(),
            settings: settings.clone(),
            ports,
            devices: Vec::new(),
            set: std::ptr::null_mut(),
            set_dirty: true,
            next_health_check: Instant::now() + HEALTH_CHECK_EVERY,
            next_flow_upkeep: Instant::now(),
        };
        w.warn_about_settings();
        let names = resolve_devices(&settings);
        log!(
            "pg_netstat: worker started for port(s) {} on device(s) {} (capture method {})",
            w.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", "),
            names.join(", "),
            settings.method.as_str()
        );
        let (now, _) = wall_now();
        w.devices = names.into_iter().map(|n| Device::new(n, &settings, now)).collect();
        // History of devices still configured survives a worker restart; the rest goes.
        STATE.exclusive().retain(&w.devices.iter().map(|d| d.name.clone()).collect::<Vec<_>>());
        w.open_due();
        w
    }

    fn warn_about_settings(&self) {
        let s = &self.settings;
        if s.timeout_ms as u64 >= s.packet_wait_time as u64 * 1000 {
            warning!(
                "pg_netstat: pg_netstat.pcap_timeout ({} ms) is not below pg_netstat.packet_wait_time ({} s): packets may be counted in the interval after their own",
                s.timeout_ms,
                s.packet_wait_time
            );
        }
    }

    fn open_due(&mut self) {
        let now = Instant::now();
        let cs = capture_settings(&self.settings);
        for d in self.devices.iter_mut() {
            if d.ring.is_none() && d.retry_at <= now {
                d.open(&self.ports, self.settings.method, cs);
                if d.ring.is_some() {
                    self.set_dirty = true;
                }
            }
        }
    }

    fn run(&mut self) -> ! {
        let mut readable: Vec<usize> = Vec::with_capacity(MAX_DEVICES);
        loop {
            self.wait(&mut readable);
            pg_sys::check_for_interrupts!();
            if let Some(ms) = self.clock.step() {
                log!(
                    "pg_netstat: the system clock stepped {} by {:.1} s; packets stamped before the step are counted in the oldest open interval",
                    if ms < 0 { "back" } else { "forward" },
                    ms.abs() as f64 / 1000.0
                );
            }
            if BackgroundWorker::sighup_received() {
                self.reload();
            }
            if INJECT_ERROR.get().swap(false, std::sync::atomic::Ordering::AcqRel) {
                // Requested by pg_netstat_inject_worker_error(), to prove the restart path.
                error!("pg_netstat: error injected by pg_netstat_inject_worker_error()");
            }
            for i in 0..self.devices.len() {
                if self.devices[i].retire_old_ring(&self.ports, false) {
                    self.set_dirty = true;
                }
                let blocks = self.devices[i].drain(&self.ports);
                if blocks == 0 && readable.contains(&i) {
                    self.devices[i].check_socket_error();
                    if self.devices[i].ring.is_none() {
                        self.set_dirty = true;
                    }
                }
            }
            if Instant::now() >= self.next_health_check {
                self.next_health_check = Instant::now() + HEALTH_CHECK_EVERY;
                let cs = capture_settings(&self.settings);
                for d in self.devices.iter_mut() {
                    let had = d.ring.as_ref().map(Source::fd);
                    d.health_check(&self.ports, self.settings.method, cs);
                    if d.ring.as_ref().map(Source::fd) != had {
                        self.set_dirty = true;
                    }
                }
            }
            self.open_due();
            self.publish();
            self.flow_upkeep();
        }
    }

    /// Once a second: gives flows their owners and folds closed or idle flows into the
    /// role and database totals. A closed connection stays visible for one interval
    /// plus the wait, so the interval it ended in can still be read next to it.
    fn flow_upkeep(&mut self) {
        if !flowshm::enabled() || Instant::now() < self.next_flow_upkeep {
            return;
        }
        self.next_flow_upkeep = Instant::now() + Duration::from_secs(1);
        let (_, now_us) = wall_now();
        let linger_us = (self.settings.interval as i64 + self.settings.packet_wait_time as i64) * 1_000_000;
        let idle_us = self.settings.flow_idle_timeout as i64 * 1_000_000;
        flowshm::with_table(true, |t| {
            t.resolve_owners();
            t.sweep(now_us, linger_us, idle_us);
        });
    }

    /// Sleeps until a ring has data, the latch is set, or the next interval is due.
    fn wait(&mut self, readable: &mut Vec<usize>) {
        readable.clear();
        if self.set_dirty || self.set.is_null() {
            self.rebuild_wait_set();
        }
        let timeout = self.timeout_ms();
        // SAFETY: WaitEvent is plain data; zeroed entries are only written by the call.
        let mut events: [pg_sys::WaitEvent; 2 * MAX_DEVICES + 2] = unsafe { std::mem::zeroed() };
        // SAFETY: `set` was built by rebuild_wait_set and is valid; `events` has room for
        // the count we pass.
        let n = unsafe {
            pg_sys::WaitEventSetWait(self.set, timeout, events.as_mut_ptr(), events.len() as i32, PG_WAIT_EXTENSION)
        };
        for e in &events[..n.max(0) as usize] {
            if e.events & pg_sys::WL_LATCH_SET != 0 {
                // SAFETY: MyLatch is this process's latch.
                unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
            }
            if e.events & pg_sys::WL_SOCKET_READABLE != 0 {
                readable.push(e.user_data as usize);
            }
        }
    }

    fn timeout_ms(&self) -> std::ffi::c_long {
        let (_, now_us) = wall_now();
        let cap_ms = self.settings.interval as i64 * 1000;
        let mut ms = cap_ms.min(HEALTH_CHECK_EVERY.as_millis() as i64);
        for d in &self.devices {
            if d.more {
                return 0;
            }
            ms = ms.min(d.buckets.next_deadline() * 1000 - now_us / 1000);
            if let Some(old) = &d.old_ring {
                ms = ms.min(old.close_at.saturating_duration_since(Instant::now()).as_millis() as i64);
            }
            if d.ring.is_none() {
                ms = ms.min(d.retry_at.saturating_duration_since(Instant::now()).as_millis() as i64);
            }
        }
        // A clock step makes the deadlines meaningless for a moment: the bounds keep the
        // worker neither spinning nor asleep for long.
        ms.clamp(0, cap_ms) as std::ffi::c_long
    }

    fn rebuild_wait_set(&mut self) {
        // SAFETY: the set is ours (created below, in TopMemoryContext or with no
        // resource owner) and freed exactly once before being replaced.
        unsafe {
            if !self.set.is_null() {
                pg_sys::FreeWaitEventSet(self.set);
                self.set = std::ptr::null_mut();
            }
            // Every device may briefly have a second ring while settings change.
            let set = create_wait_event_set(2 * MAX_DEVICES as i32 + 2);
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_LATCH_SET, PGINVALID_SOCKET, pg_sys::MyLatch, std::ptr::null_mut());
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, std::ptr::null_mut(), std::ptr::null_mut());
            for (i, d) in self.devices.iter().enumerate() {
                for r in d.ring.iter().chain(d.old_ring.as_ref().map(|o| &o.ring)) {
                    pg_sys::AddWaitEventToSet(set, pg_sys::WL_SOCKET_READABLE, r.fd(), std::ptr::null_mut(), i as *mut c_void);
                }
            }
            self.set = set;
        }
        self.set_dirty = false;
    }

    fn reload(&mut self) {
        // SAFETY: the documented way for a background worker to re-read the config.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        let new = Settings::current();
        if new == self.settings {
            return;
        }
        let old = std::mem::replace(&mut self.settings, new.clone());
        log!("pg_netstat: settings reloaded");
        self.warn_about_settings();
        let (now, _) = wall_now();

        // Everything counted so far belongs to the old settings.
        for d in self.devices.iter_mut() {
            d.drain(&self.ports);
        }

        // Interval length and wait: the interval in progress ends under its old length.
        let mut early: Vec<(String, Vec<Closed>)> = Vec::new();
        for d in self.devices.iter_mut() {
            let rows = d.buckets.reconfigure(new.interval, new.packet_wait_time, now);
            if !rows.is_empty() {
                early.push((d.name.clone(), rows));
            }
        }

        // Device list: close only the devices that left (publishing what they held) and
        // open only the ones that joined; the others keep their rings untouched.
        let names = resolve_devices(&new);
        let (kept, mut leaving): (Vec<Device>, Vec<Device>) =
            self.devices.drain(..).partition(|d| names.contains(&d.name));
        for d in leaving.iter_mut() {
            early.push((d.name.clone(), d.buckets.flush()));
        }
        self.publish_rows(early);
        self.devices = kept;
        for n in &names {
            if !self.devices.iter().any(|d| &d.name == n) {
                self.devices.push(Device::new(n.clone(), &new, now));
            }
        }
        self.devices.sort_by_key(|d| names.iter().position(|n| n == &d.name));
        STATE.exclusive().retain(&names);

        // Ring settings, ports or method: rebuild every ring, each bound anew before the
        // old one closes.
        let cs = capture_settings(&new);
        let ports = all_ports(self.server_port, &new);
        if capture_settings(&old) != cs || ports != self.ports || old.method != new.method {
            self.ports = ports;
            for d in self.devices.iter_mut() {
                d.rebuild(&self.ports, new.method, cs);
            }
        }
        self.set_dirty = true;
        self.open_due();
    }

    /// Publishes rows closed outside the normal schedule (reload), by device name.
    fn publish_rows(&mut self, rows: Vec<(String, Vec<Closed>)>) {
        if rows.iter().all(|(_, r)| r.is_empty()) {
            return;
        }
        let (_, now_us) = wall_now();
        let mut shared = STATE.exclusive();
        for (name, closed) in rows {
            if let Some(e) = shared.entry_mut(&name) {
                for c in &closed {
                    e.push(c, now_us);
                }
            }
        }
    }

    /// Moves closed intervals and changed status into shared memory.
    fn publish(&mut self) {
        let (now, now_us) = wall_now();
        let mut work: Vec<(usize, Vec<Closed>)> = Vec::new();
        for (i, d) in self.devices.iter_mut().enumerate() {
            if d.buckets.next_deadline() <= now {
                // Drops not flagged by the ring (or from libpcap) are learned here, and
                // charged to the interval open now, never to one being closed.
                if let Some(r) = d.ring.as_mut() {
                    if let Ok(st) = r.read_kernel_stats() {
                        d.buckets.record_drops(now, st.dropped.saturating_sub(d.drops_seen));
                        d.drops_seen = st.dropped;
                        d.freezes_seen = st.freezes;
                    }
                }
            }
            let closed = d.buckets.close_due(now);
            if !closed.is_empty() || d.dirty {
                work.push((i, closed));
            }
        }
        if work.is_empty() {
            return;
        }
        let mut shared = STATE.exclusive();
        for (i, closed) in work {
            let d = &mut self.devices[i];
            let Some(e) = shared.entry_mut(&d.name) else { continue };
            for c in &closed {
                e.push(c, now_us);
            }
            if e.state != d.state || e.state_since_us == 0 {
                e.state_since_us = now_us;
            }
            e.state = d.state;
            e.method = d.ring.as_ref().map(|r| r.method()).unwrap_or(self.settings.method) as u8;
            e.set_error(&d.error);
            e.total = d.total;
            e.kernel_drops = d.kernel_drops_total + d.drops_seen;
            e.ring_freezes = d.freezes_total + d.freezes_seen;
            d.dirty = false;
        }
    }
}

#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
unsafe fn create_wait_event_set(n: i32) -> *mut pg_sys::WaitEventSet {
    // SAFETY: TopMemoryContext lives as long as the process.
    unsafe { pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, n) }
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn create_wait_event_set(n: i32) -> *mut pg_sys::WaitEventSet {
    // SAFETY: with no resource owner the set is ours to free, which we do.
    unsafe { pg_sys::CreateWaitEventSet(std::ptr::null_mut(), n) }
}
