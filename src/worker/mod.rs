//! The capture worker: one process, one thread, one wait on the latch, postmaster death
//! and every ring socket at once. It drains rings as soon as the kernel hands over a
//! block, buckets packets by their own timestamps, and publishes closed intervals.

use crate::flowshm;
use crate::gucs::Settings;
use crate::persist;
use crate::shmem::{self, INJECT_ERROR, STATE, WORKER_EXITED_US, WORKER_PID};
use pg_netstat_core::capture::source::Source;
use pg_netstat_core::capture::MAX_DEVICES;
use pg_netstat_core::device;
use pg_netstat_core::kernel_counters::KernelCounters;
#[cfg(linux_native)]
use pg_netstat_core::privileges;
use pg_netstat_core::stats::{Bucketing, Closed};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::c_void;

mod env;
mod reload;
mod setup;
use env::{PgEnv, SharedFlows};
use setup::{all_ports, capture_settings, resolve_devices, ClockWatch};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WORKER_NAME: &str = "pg_netstat collector";
/// How soon PostgreSQL starts the worker again after it exits with an error.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// How often devices are looked at for down/up, removal and re-creation.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);
const PG_WAIT_EXTENSION: u32 = 0x0700_0000;
const PGINVALID_SOCKET: pg_sys::pgsocket = -1;
/// Closed or idle flows folded per hold of the flows lock, and holds per upkeep: a flood
/// of short connections is folded at up to this many a second without one long hold.
const SWEEP_BUDGET: usize = 1024;
const SWEEP_ROUNDS: usize = 64;

/// The worker's entry point as the postmaster finds it (also how `net_raw` knows the
/// process that keeps CAP_NET_RAW).
pub const MAIN_FUNCTION: &std::ffi::CStr = c"pg_netstat_worker_main";

pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type("pg_netstat")
        .set_library("pg_netstat")
        .set_function(MAIN_FUNCTION.to_str().unwrap_or_default())
        // A connection to no database, as the logical replication launcher has: it is what
        // lists the worker in pg_stat_activity (backend_type "pg_netstat", its wait event
        // while it waits). Such a worker may start once the server is consistent: at once
        // on a primary, when hot standby opens on a replica.
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
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
    #[cfg(linux_native)]
    match privileges::raise_net_raw() {
        Ok(true) => {}
        Ok(false) => {} // reported per device as no_permission when sockets fail
        Err(e) => log!("pg_netstat: could not raise CAP_NET_RAW: {e}"),
    }
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: registering an exit callback is what before_shmem_exit is for; it runs in
    // this process while shared memory is still attached.
    unsafe { pg_sys::before_shmem_exit(Some(forget_worker_pid), pg_sys::Datum::from(0)) };
    let mut worker = Worker::start();
    // Only now: until this worker has taken its devices over, the views show them as
    // the previous one left them, and that is `stopped`, not its last `capturing`.
    WORKER_PID.get().store(std::process::id() as i32, Ordering::Release);
    worker.run();
}

/// A worker that has exited has no PID to signal: pg_netstat_inject_worker_error() must
/// not signal whatever process gets the number next, nor leave an error for the next
/// worker to raise.
#[pg_guard]
unsafe extern "C-unwind" fn forget_worker_pid(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    WORKER_EXITED_US.get().store(wall_now().1, Ordering::Release);
    let _ = WORKER_PID.get().compare_exchange(std::process::id() as i32, 0, Ordering::AcqRel, Ordering::Acquire);
    INJECT_ERROR.get().store(false, Ordering::Release);
}

unsafe extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends. pgrx's `pg_sys::die` is a Rust wrapper
    /// for calling it; a signal handler needs the C function itself.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

#[cfg(not(feature = "pg18"))]
unsafe fn set_sigterm_to_die() {
    // SAFETY: `die` is PostgreSQL's own async-signal-safe SIGTERM handler for backends.
    unsafe { pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die)) };
}

#[cfg(feature = "pg18")]
unsafe fn set_sigterm_to_die() {
    // SAFETY: `die` is PostgreSQL's own async-signal-safe SIGTERM handler for backends.
    unsafe { pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(postgres_die)) };
}

fn wall_now() -> (i64, i64) {
    // Before 1970 only on a badly broken clock; count it as 0 rather than fail.
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.as_micros() as i64)
}

type Device = device::Device<Source>;

fn new_device(name: String, s: &Settings, now: i64) -> Device {
    Device::new(name, Bucketing::new(s.interval, s.packet_wait_time, now), Instant::now())
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
    saver: persist::Saver,
    /// `finish` has run: the process is on its way out.
    finished: bool,
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
            saver: persist::Saver::new(settings.save_interval),
            finished: false,
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
        w.devices = names.into_iter().map(|n| new_device(n, &settings, now)).collect();
        // History of devices still configured survives a worker restart; the rest goes.
        // Their running totals carry on from what the previous worker published, so
        // they never go back (only pg_netstat_reset() restarts what the views show).
        // What the server counted before it last stopped, when this is the first worker
        // since it started.
        persist::load_once();
        let names: Vec<String> = w.devices.iter().map(|d| d.name.clone()).collect();
        {
            let mut shared = STATE.exclusive();
            shared.take_over(&names, wall_now().1);
            for d in w.devices.iter_mut() {
                if let Some(e) = shared.entry(&d.name) {
                    d.total = e.total;
                    d.kernel = KernelCounters::carried_over(e.kernel_drops, e.ring_freezes);
                }
            }
        }
        flowshm::write(|t| t.set_devices(&names));
        w.open_due();
        // What opened is shown now, not after the first wait (up to 5 s on a quiet device).
        w.publish();
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
            if d.source.is_none() && d.retry_at <= now {
                d.open_if_due(&mut PgEnv, &self.ports, self.settings.method, cs);
                if d.source.is_some() {
                    self.set_dirty = true;
                }
            }
        }
    }

    fn run(&mut self) -> ! {
        let mut readable: Vec<usize> = Vec::with_capacity(MAX_DEVICES);
        loop {
            self.wait(&mut readable);
            // SAFETY: a plain read of a flag PostgreSQL's SIGTERM handler sets.
            if unsafe { std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) } != 0 && !self.finished {
                // Stopping (shutdown, or pg_terminate_backend): keep what was counted
                // before the check below ends this process. Interrupts are held off
                // meanwhile: a log line would otherwise end the process halfway (errfinish
                // checks for interrupts).
                // SAFETY: PostgreSQL's HOLD_INTERRUPTS()/RESUME_INTERRUPTS(), on this
                // process's own counter, balanced around a call that cannot unwind past them
                // without the process exiting.
                unsafe { pg_sys::InterruptHoldoffCount += 1 };
                self.finish();
                // SAFETY: as above: the matching RESUME_INTERRUPTS().
                unsafe { pg_sys::InterruptHoldoffCount -= 1 };
                self.finished = true;
            }
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
                if self.devices[i].retire_due(&mut PgEnv, &mut SharedFlows, &self.ports, false) {
                    self.set_dirty = true;
                }
                let blocks = self.devices[i].drain(&mut PgEnv, &mut SharedFlows, &self.ports);
                if blocks == 0 && readable.contains(&i) {
                    self.devices[i].check_socket_error(&mut PgEnv);
                    if self.devices[i].source.is_none() {
                        self.set_dirty = true;
                    }
                }
            }
            if Instant::now() >= self.next_health_check {
                self.next_health_check = Instant::now() + HEALTH_CHECK_EVERY;
                let cs = capture_settings(&self.settings);
                for d in self.devices.iter_mut() {
                    let had = d.source.as_ref().map(Source::fd);
                    d.health_check(&mut PgEnv, &self.ports, self.settings.method, cs);
                    if d.source.as_ref().map(Source::fd) != had {
                        self.set_dirty = true;
                    }
                }
            }
            self.open_due();
            self.publish();
            self.flow_upkeep();
            self.saver.tick();
        }
    }

    /// The worker is stopping: counts what the rings still hold, publishes every open
    /// interval (the one in progress too, partial: a worker that starts again within it
    /// adds to the same row), publishes the running totals and saves the state file.
    fn finish(&mut self) {
        let mut rows: Vec<(String, Vec<Closed>)> = Vec::new();
        let (now, _) = wall_now();
        for d in self.devices.iter_mut() {
            d.drain(&mut PgEnv, &mut SharedFlows, &self.ports);
            // Drops since the last interval closed, before the sockets go.
            d.observe_kernel(now);
            rows.push((d.name.clone(), d.buckets.flush()));
            d.dirty = true;
        }
        self.publish_rows(rows);
        self.publish();
        self.saver.finish();
    }

    /// Once a second: forgets closed and idle flows (their figures are already in the
    /// role and database totals) and owner records of long-gone backends, oldest first,
    /// a bounded batch per hold of the lock. A closed connection stays visible for one
    /// interval plus the wait, so the interval it ended in can still be read next to it.
    fn flow_upkeep(&mut self) {
        if !flowshm::enabled() || Instant::now() < self.next_flow_upkeep {
            return;
        }
        self.next_flow_upkeep = Instant::now() + Duration::from_secs(1);
        let (_, now_us) = wall_now();
        let linger_us = (self.settings.interval as i64 + self.settings.packet_wait_time as i64) * 1_000_000;
        let idle_us = self.settings.flow_idle_timeout as i64 * 1_000_000;
        for _ in 0..SWEEP_ROUNDS {
            if !flowshm::write(|t| t.sweep(now_us, linger_us, idle_us, SWEEP_BUDGET)).unwrap_or(false) {
                break;
            }
        }
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
        if let Some(save_ms) = self.saver.due_in_ms() {
            ms = ms.min(save_ms);
        }
        for d in &self.devices {
            if d.more {
                return 0;
            }
            ms = ms.min(d.buckets.next_deadline() * 1000 - now_us / 1000);
            if let Some(old) = &d.retiring {
                ms = ms.min(old.close_at.saturating_duration_since(Instant::now()).as_millis() as i64);
            }
            if d.source.is_none() {
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
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                PGINVALID_SOCKET,
                pg_sys::MyLatch,
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                PGINVALID_SOCKET,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            for (i, d) in self.devices.iter().enumerate() {
                for r in d.source.iter().chain(d.retiring.as_ref().map(|o| &o.source)) {
                    pg_sys::AddWaitEventToSet(
                        set,
                        pg_sys::WL_SOCKET_READABLE,
                        r.fd(),
                        std::ptr::null_mut(),
                        i as *mut c_void,
                    );
                }
            }
            self.set = set;
        }
        self.set_dirty = false;
    }

    /// Publishes rows closed outside the normal schedule (reload), by device name.
    fn publish_rows(&mut self, rows: Vec<(String, Vec<Closed>)>) {
        if rows.iter().all(|(_, r)| r.is_empty()) {
            return;
        }
        let (_, now_us) = wall_now();
        let mut shared = shmem::exclusive();
        for (name, closed) in rows {
            for c in &closed {
                shared.push_closed(&name, c, now_us);
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
                d.observe_kernel(now);
            }
            let closed = d.buckets.close_due(now);
            if !closed.is_empty() || d.dirty {
                work.push((i, closed));
            }
        }
        if work.is_empty() {
            return;
        }
        let mut shared = shmem::exclusive();
        for (i, closed) in work {
            let d = &mut self.devices[i];
            for c in &closed {
                shared.push_closed(&d.name, c, now_us);
            }
            let Some(e) = shared.entry_mut(&d.name) else { continue };
            if e.state != d.state || e.state_since_us == 0 {
                e.state_since_us = now_us;
            }
            e.state = d.state;
            e.method = d.source.as_ref().map(|r| r.method()).unwrap_or(self.settings.method) as u8;
            e.set_error(&d.error);
            e.total = d.total;
            e.kernel_drops = d.kernel.drops();
            e.ring_freezes = d.kernel.freezes();
            d.dirty = false;
        }
    }
}

#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe fn create_wait_event_set(n: i32) -> *mut pg_sys::WaitEventSet {
    // SAFETY: TopMemoryContext lives as long as the process.
    unsafe { pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, n) }
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn create_wait_event_set(n: i32) -> *mut pg_sys::WaitEventSet {
    // SAFETY: with no resource owner the set is ours to free, which we do.
    unsafe { pg_sys::CreateWaitEventSet(std::ptr::null_mut(), n) }
}
