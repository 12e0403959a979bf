//! What pg_netstat counted, kept across server restarts: the worker loads the saved file
//! once per life of shared memory (a worker restarted after an error carries on from
//! shared memory instead), saves it when it stops and every `pg_netstat.save_interval`,
//! and after `pg_netstat_reset()`. The statement table (pg_netstat_statements) is saved
//! and loaded with the rest. The format and the atomic write are in `savefile`;
//! this file moves state between it and shared memory, and keeps the write off the
//! capture loop: for a periodic save the collector only copies the state under the locks;
//! a thread of its own, which calls nothing of PostgreSQL, encodes, writes and fsyncs it.

use crate::flowshm;
use crate::shmem::{self, SAVE_REQUESTED};
use crate::stmtshm;
use pg_netstat_core::savefile::{self, SavedDevice, SavedState, DIR, FILE_NAME};
use pg_netstat_core::statements::conns;
use pg_netstat_core::statements::table::Row;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The file, relative to the data directory (every server process runs there).
pub fn path() -> PathBuf {
    Path::new(DIR).join(FILE_NAME)
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros() as i64
}

/// A copy of everything saved, from shared memory.
pub fn collect(at_exit: bool) -> SavedState {
    let mut s = SavedState {
        saved_at_us: now_us(),
        // SAFETY: plain reads of the control file's copy in shared memory and of this
        // process's recovery state; both are valid in any process attached to it.
        system_identifier: unsafe { pg_sys::GetSystemIdentifier() },
        // SAFETY: as above.
        in_recovery: unsafe { pg_sys::RecoveryInProgress() },
        at_exit,
        writer: env!("CARGO_PKG_VERSION").to_string(),
        timeline: timeline(),
        ..SavedState::default()
    };
    {
        let shared = shmem::share();
        for (d, rows) in shared.devices_with_history() {
            s.devices.push(SavedDevice {
                name: d.name().to_string(),
                total: d.total,
                total_base: d.total_base,
                kernel_drops: d.kernel_drops,
                ring_freezes: d.ring_freezes,
                rows: rows.copied().collect(),
            });
        }
    }
    if let Some((roles, databases, h)) = flowshm::read(|v| (v.saved_rows(true), v.saved_rows(false), *v.header)) {
        s.roles = roles;
        s.databases = databases;
        s.flow_stats = savefile::FlowStats {
            stats_reset_us: h.stats_reset_us,
            evictions: h.evictions,
            folded: h.folded,
            owner_overflow: h.owner_overflow,
        };
    }
    if let Some((rows, counters)) = stmtshm::snapshot() {
        s.statements = rows;
        s.statement_table = counters;
    }
    if let Some(egress) = flowshm::read(|v| v.saved_egress()) {
        s.egress = egress;
    }
    // Ended connections' rows and the live ones as of their latest reading: each
    // connection is in exactly one of the two at any moment, never in both.
    if let Some((h, slots, apps)) = stmtshm::copy_conns() {
        s.applications = conns::totals(&apps, &slots);
        s.application_table =
            savefile::AppTableCounters { stats_reset_us: h.stats_reset_us, app_overflow: h.app_overflow };
    }
    s
}

/// The WAL timeline this server is on (replaying, on a standby).
fn timeline() -> u32 {
    // SAFETY: both read shared recovery state, valid in any process attached to shared
    // memory; the insertion timeline is only asked for once recovery has ended.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            let mut tli: pg_sys::TimeLineID = 0;
            pg_sys::GetXLogReplayRecPtr(&mut tli);
            tli
        } else {
            pg_sys::GetWALInsertionTimeLine()
        }
    }
}

/// Why a well-formed file still must not be loaded here, if it must not.
fn not_for_us(s: &SavedState) -> Option<String> {
    // SAFETY: as in `collect`.
    let (sysid, in_recovery) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::RecoveryInProgress()) };
    let tli = timeline();
    if s.system_identifier != sysid {
        return Some(format!(
            "it was written by another cluster (system identifier {}, this cluster's is {sysid})",
            s.system_identifier
        ));
    }
    if in_recovery && !s.in_recovery {
        return Some(
            "it was written by a primary and this server is a standby: it came with a base backup and describes the primary's traffic"
                .into(),
        );
    }
    // A primary's file on another timeline: this server was made from a copy of that
    // primary (a standby promoted before its collector first ran, a point-in-time
    // recovery); its counts are the other server's. (A standby's own file, then a
    // promotion, is this server's: kept.)
    if !s.in_recovery && s.timeline != 0 && s.timeline != tli {
        return Some(format!(
            "it was written by a primary on timeline {} and this server is on timeline {tli}: it came with a copy of that primary and describes its traffic",
            s.timeline
        ));
    }
    None
}

/// Loads the saved file into shared memory, once per life of shared memory. Bad files
/// are logged once, set aside, and counting starts fresh; nothing here can stop the
/// worker. Call before the worker reads its devices' totals from shared memory.
pub fn load_once() {
    {
        let mut shared = shmem::exclusive();
        if shared.loaded {
            return;
        }
        // Set first: whatever happens below, a restarted worker must not load again
        // over what it counts meanwhile.
        shared.loaded = true;
    }
    let path = path();
    let problem = if savefile::load_unfinished(&path) {
        // The last load of this file never ended: it killed its process (or the machine).
        let _ = savefile::end_load(&path);
        if !path.exists() {
            return;
        }
        "a load of it began and never finished (the process loading it ended: killed, out of memory, or a crash), so it is not loaded again".to_string()
    } else {
        if let Err(e) = savefile::begin_load(&path) {
            log!(
                "pg_netstat: could not mark the saved state \"{}\" as being loaded ({e}): a load that kills the collector would be tried again",
                path.display()
            );
        }
        let problem = load_file(&path);
        let _ = savefile::end_load(&path);
        match problem {
            None => return,
            Some(p) => p,
        }
    };
    let now_s = now_us() / 1_000_000;
    match savefile::set_aside(&path, now_s) {
        Ok(to) => log!(
            "pg_netstat: the saved state \"{}\" was not loaded: {problem}; it was moved to \"{}\" and counting starts fresh",
            path.display(),
            to.display()
        ),
        Err(e) => log!(
            "pg_netstat: the saved state \"{}\" was not loaded: {problem}; counting starts fresh (could not move it aside: {e})",
            path.display()
        ),
    }
}

/// Loads the file at `path` if it is there, whole and this server's; what kept it from
/// loading otherwise.
fn load_file(path: &std::path::Path) -> Option<String> {
    // A file that cannot be read is set aside too: the next save would replace it.
    Some(match savefile::read(path) {
        Ok(None) => return None,
        Err(e) => format!("it could not be read: {e}"),
        Ok(Some(bytes)) => match savefile::decode(&bytes) {
            Ok(mut s) => match not_for_us(&s) {
                None => {
                    let started = Instant::now();
                    let statements = std::mem::take(&mut s.statements);
                    let loaded = apply(&s, statements);
                    log_loaded(&s, &loaded, bytes.len(), started.elapsed());
                    return None;
                }
                Some(why) => why,
            },
            Err(e) => e.to_string(),
        },
    })
}

/// What a load put into shared memory.
struct Loaded {
    devices: usize,
    rows: usize,
    statements: usize,
    /// Statement rows folded into "other" rows: the table is smaller than the saved one.
    folded: u64,
}

fn log_loaded(s: &SavedState, l: &Loaded, bytes: usize, took: Duration) {
    let age_s = now_us().saturating_sub(s.saved_at_us) as f64 / 1e6;
    let when = if s.at_exit {
        "when the collector stopped".to_string()
    } else {
        format!(
            "by a periodic save; the server then stopped without a clean shutdown, so what was counted from that save until it stopped is lost (at most the {age_s:.0} s since)"
        )
    };
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let folded = if l.folded > 0 {
        format!(
            " ({} folded into 'other' rows to fit pg_netstat.max_statements = {})",
            l.folded,
            stmtshm::read(|h, _| h.capacity).unwrap_or(0)
        )
    } else {
        String::new()
    };
    log!(
        "pg_netstat: loaded {} of {}, device totals, {}, {} and {}{folded} from \"{}\" ({bytes} bytes in {:.1} ms), saved {age_s:.0} s ago {when}",
        plural(l.rows, "interval", "intervals"),
        plural(l.devices, "device", "devices"),
        plural(s.roles.len(), "role total", "role totals"),
        plural(s.databases.len(), "database total", "database totals"),
        plural(l.statements, "statement row", "statement rows"),
        path().display(),
        took.as_secs_f64() * 1000.0
    );
}

/// Puts a loaded state, and its statement rows, into shared memory.
fn apply(s: &SavedState, statements: Vec<Row>) -> Loaded {
    let (mut devices, mut rows) = (0, 0);
    {
        let mut shared = shmem::exclusive();
        for d in &s.devices {
            let Some(e) = shared.entry_mut(&d.name) else { continue };
            e.total = d.total;
            e.total_base = d.total_base;
            e.kernel_drops = d.kernel_drops;
            e.ring_freezes = d.ring_freezes;
            devices += 1;
            // Oldest first: a smaller pg_netstat.history than before keeps the newest.
            for r in &d.rows {
                shared.push(&d.name, *r);
            }
            rows += d.rows.len().min(shmem::history_capacity());
        }
    }
    let f = s.flow_stats;
    flowshm::write(|t| {
        t.restore_totals(&s.roles, &s.databases, [f.evictions, f.folded, f.owner_overflow], f.stats_reset_us);
        t.restore_egress(&s.egress);
    });
    let a = s.application_table;
    stmtshm::write_all(|_, c| c.restore(&s.applications, a.app_overflow, a.stats_reset_us));
    let n = statements.len();
    let folded = stmtshm::restore(statements, &s.statement_table).unwrap_or(0);
    // pg_netstat_reset() called between the server's start and this load: what it reset
    // includes what was just loaded.
    if SAVE_REQUESTED.get().load(Ordering::Acquire) {
        reset_counts(now_us());
    }
    Loaded { devices, rows, statements: n, folded }
}

/// What pg_netstat_reset() resets: role, database and egress totals, the flow table's
/// counters, the device totals the views show, the statement table and the per-application
/// totals; then the file is saved soon.
pub fn reset_counts(now_us: i64) {
    flowshm::write(|t| t.reset(now_us));
    stmtshm::reset(now_us);
    let mut shared = shmem::exclusive();
    for d in shared.devices.iter_mut().filter(|d| d.in_use) {
        d.total_base = d.total;
    }
    drop(shared);
    // Into the saved file too, soon: a crash before the next periodic save must not
    // bring back what was reset.
    SAVE_REQUESTED.get().store(true, Ordering::Release);
}

/// Encodes and writes the state now, in this process (at exit).
pub fn save_now() -> Result<(usize, Duration), String> {
    let started = Instant::now();
    let bytes = savefile::encode(&collect(true));
    write(&bytes).map(|_| (bytes.len(), started.elapsed()))
}

fn write(bytes: &[u8]) -> Result<(), String> {
    savefile::write_atomically(Path::new(DIR), FILE_NAME, bytes)
        .map_err(|e| format!("could not write \"{}\": {e}", path().display()))
}

/// Periodic saves, written by a thread so a slow disk never holds up capture.
pub struct Saver {
    every: Option<Duration>,
    next: Instant,
    /// The writer thread: the file's size and the time it took to encode and write it.
    job: Option<JoinHandle<Result<(usize, Duration), String>>>,
    /// How long the copy of the state took in the collector, for the log.
    copy_took: Duration,
    /// The last failure logged, so a disk that stays full is reported once.
    last_error: Option<String>,
}

impl Saver {
    pub fn new(every_s: u32) -> Saver {
        let every = (every_s > 0).then(|| Duration::from_secs(every_s as u64));
        Saver {
            every,
            next: Instant::now() + every.unwrap_or_default(),
            job: None,
            copy_took: Duration::ZERO,
            last_error: None,
        }
    }

    pub fn set_interval(&mut self, every_s: u32) {
        let s = Saver::new(every_s);
        (self.every, self.next) = (s.every, s.next);
    }

    /// Ms until the next periodic save is due (for the worker's wait), if any.
    pub fn due_in_ms(&self) -> Option<i64> {
        if self.job.is_some() {
            return Some(100); // look again soon for the thread's result
        }
        self.every.map(|_| self.next.saturating_duration_since(Instant::now()).as_millis() as i64)
    }

    /// Collects the result of a finished write and starts the next when it is due or was
    /// asked for (pg_netstat_reset()).
    pub fn tick(&mut self) {
        if self.job.as_ref().is_some_and(|j| j.is_finished()) {
            let result =
                self.job.take().map(|j| j.join().unwrap_or_else(|_| Err("the writing thread panicked".into())));
            if let Some(r) = result {
                self.report(r);
            }
        }
        if self.job.is_some() {
            return;
        }
        let asked = SAVE_REQUESTED.get().swap(false, Ordering::AcqRel);
        let due = self.every.is_some() && Instant::now() >= self.next;
        if !(asked || due) {
            return;
        }
        if let Some(every) = self.every {
            self.next = Instant::now() + every;
        }
        // Only the copy happens here, under the locks; encoding, writing and fsync are the
        // thread's.
        let started = Instant::now();
        let state = collect(false);
        self.copy_took = started.elapsed();
        let job = spawn_without_signals(move || {
            let started = Instant::now();
            let bytes = savefile::encode(&state);
            write(&bytes).map(|_| (bytes.len(), started.elapsed()))
        });
        match job {
            Ok(j) => self.job = Some(j),
            Err(e) => self.report(Err(format!("could not start the thread that writes \"{}\": {e}", path().display()))),
        }
    }

    fn report(&mut self, result: Result<(usize, Duration), String>) {
        match result {
            Ok((bytes, took)) => {
                debug1!(
                    "pg_netstat: saved {bytes} bytes to \"{}\": {:.1} ms copying in the collector, {:.1} ms encoding and writing in the background",
                    path().display(),
                    self.copy_took.as_secs_f64() * 1000.0,
                    took.as_secs_f64() * 1000.0
                );
                if self.last_error.take().is_some() {
                    log!("pg_netstat: the saved state is written again");
                }
            }
            Err(e) => {
                if self.last_error.as_ref() != Some(&e) {
                    warning!("pg_netstat: {e}; the previous save is kept and saving will be tried again");
                }
                self.last_error = Some(e);
            }
        }
    }

    /// The save as the worker exits: waits for a write in progress, then writes in full.
    pub fn finish(&mut self) {
        if let Some(j) = self.job.take() {
            if let Ok(Err(e)) = j.join() {
                warning!("pg_netstat: {e}");
            }
        }
        match save_now() {
            Ok((bytes, took)) => log!(
                "pg_netstat: saved the counted state to \"{}\" ({bytes} bytes in {:.1} ms)",
                path().display(),
                took.as_secs_f64() * 1000.0
            ),
            Err(e) => warning!("pg_netstat: {e}; what was counted since the last save is lost at this stop"),
        }
    }
}

/// Starts a thread with every signal blocked, so PostgreSQL's signal handlers (which
/// set latches and flags for the worker's main thread) never run on it.
fn spawn_without_signals<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<JoinHandle<T>> {
    // SAFETY: sigfillset initialises the set; pthread_sigmask only changes this thread's
    // mask, which is restored right after the new thread has inherited the full one,
    // whether or not the thread could be created.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let handle = std::thread::Builder::new().name("pg_netstat save".into()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        handle
    }
}
