//! The backend side of per-statement accounting (issue 14): each client backend on a
//! TCP connection reads its own socket's counters (`tcpinfo`) at top-level statement
//! boundaries and charges the differences to statements (`statements::attrib` says
//! how). Boundaries come from hooks, with nesting tracked the way pg_stat_statements
//! does, so only top-level statements count:
//! - ExecutorStart at nesting level 0: a planned statement starts (simple protocol;
//!   Bind of the extended protocol, also of a named statement bound again; the
//!   statement an SQL-level EXECUTE runs);
//! - ProcessUtility at level 0, except EXECUTE (its statement is the one above): a
//!   utility statement starts; after it, a COPY FROM STDIN is read again, as its data
//!   arrived while it ran;
//! - an ERROR reaching the top while no statement is running: a statement that failed
//!   before it started (syntax error, unknown table, planning error) is a statement of
//!   its own, with the query id parse analysis gave it, if any;
//! - backend exit (on_shmem_exit): what is left goes to the last statement.
//!
//! Unix-socket connections have no TCP counters: they are recognised at authentication
//! (getsockopt fails once) and cost nothing afterwards.
//!
//! Here: the backend's state, the boundary (read, attribute, charge) and the log hook's
//! part; `hooks`: the executor, utility and transaction hooks that find the boundaries;
//! `session`: a connection's start (authentication), its end and its last reading.

mod hooks;
mod session;

use hooks::{executor_end, executor_finish, executor_run, executor_start, get_user_id, my_query_id, process_utility};
use hooks::{on_subxact, on_xact};
pub use session::session_begun;

use crate::{gucs, owner_hooks, stmtshm};
use pg_netstat_core::peer::{self, BackendKind};
use pg_netstat_core::statements::conns::{AppKey, Conn, SlotId, Socket};
use pg_netstat_core::statements::nesting::Nesting;
use pg_netstat_core::statements::pending::Pending;
use pg_netstat_core::statements::{Charges, Figures, Kind, Sample, StmtKey, Target, Tracker};
use pg_netstat_core::tcpinfo;
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int};

/// This backend's state; `None` in every process that is not a client backend on TCP.
struct Local {
    tracker: Tracker<StmtKey>,
    sock: c_int,
    /// A top-level statement has started and not yet ended.
    in_statement: bool,
    /// Counting was off at some boundary: the next reading starts afresh from there.
    stale: bool,
}

/// A backend's own state, in one thread-local (PostgreSQL runs a backend on one thread,
/// so it is the process's): each hook looks it up once (a lookup is a call into the
/// dynamic loader, as this library is loaded at run time). Each part is lent for one
/// call and refused to a hook that runs while it is lent (an error reported in the
/// middle of our own work): nothing is ever reachable twice at once, and no hook waits
/// or panics for it.
struct Backend {
    local: RefCell<Option<Local>>,
    /// This backend's connection in the per-connection figures (client backends and
    /// walsenders on TCP); `None` elsewhere.
    conn: Cell<Option<ConnLocal>>,
    nesting: RefCell<Nesting>,
    pending: stmtshm::MyPending,
}

thread_local! {
    static BACKEND: Backend = const {
        Backend {
            local: RefCell::new(None),
            conn: Cell::new(None),
            nesting: RefCell::new(Nesting::new()),
            pending: stmtshm::MyPending::new(),
        }
    };
}

/// Runs `f` on this backend's state (`None` once the thread's state is gone, at exit).
fn backend<R>(f: impl FnOnce(&Backend) -> R) -> Option<R> {
    BACKEND.try_with(f).ok()
}

impl Backend {
    /// Runs `f` on the statement nesting; `None` when it is lent already.
    fn with_nesting<R>(&self, f: impl FnOnce(&mut Nesting) -> R) -> Option<R> {
        self.nesting.try_borrow_mut().ok().map(|mut n| f(&mut n))
    }

    /// The nesting level (0: top level; when lent already, as if nested: nothing starts).
    fn nesting_level(&self) -> i32 {
        self.with_nesting(|n| n.level()).unwrap_or(i32::MAX)
    }

    /// Runs `f` on the statement state; `None` when there is none (not a client backend
    /// on TCP), or when it is lent already: a hook of ours that runs from inside our own
    /// work (an error reported meanwhile) does nothing rather than reach it twice.
    fn with_local<R>(&self, f: impl FnOnce(&mut Local) -> R) -> Option<R> {
        self.local.try_borrow_mut().ok()?.as_mut().map(f)
    }

    fn in_local(&self) -> bool {
        self.with_local(|_| ()).is_some()
    }

    fn set_in_statement(&self, v: bool) {
        self.with_local(|l| l.in_statement = v);
    }

    fn in_statement(&self) -> bool {
        self.with_local(|l| l.in_statement).unwrap_or(false)
    }
}

/// Runs our own work from a hook that is not pgrx-guarded (its guard costs a sigsetjmp
/// and a thread check per call): a panic, a bug of ours, is caught here and raised as an
/// ERROR once `f`'s frames are gone, as pgrx's guard would. The ERROR leaves by longjmp,
/// so nothing that needs dropping is left in this frame when it is raised (the message
/// is leaked: one string, once per bug).
fn guarded(f: impl FnOnce()) {
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let msg = e
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        drop(e);
        let msg = std::ffi::CString::new(msg.replace('\0', " ")).unwrap_or_default().into_raw();
        // SAFETY: a C string, never freed.
        unsafe { raise(msg) };
    }
}

/// # Safety
/// `msg` is a C string.
#[cold]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn raise(msg: *const c_char) {
    // SAFETY: by the caller's promise.
    let msg = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
    pgrx::error!("pg_netstat: internal error in statement accounting: {msg}");
}

#[derive(Clone, Copy)]
struct ConnLocal {
    key: AppKey,
    sock: c_int,
    /// `None` when every slot was taken: the figures reach the totals at exit only.
    slot: Option<SlotId>,
}

static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hooks and makes PostgreSQL compute query ids (compute_query_id = auto).
/// (The log hook's part is `on_report`.)
///
/// # Safety
/// From _PG_init only, once.
pub unsafe fn install() {
    // SAFETY: by the caller's promise: hook chaining, single-threaded, before any
    // backend exists.
    unsafe {
        pg_sys::EnableQueryId();
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_EXECUTOR_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Reads the socket and lets `f` turn the reading into charges, which go to shared
/// memory. Nothing when this backend does not count, or counting is off.
fn boundary(b: &Backend, f: impl FnOnce(&mut Tracker<StmtKey>, Sample) -> Charges<StmtKey>) {
    boundary_with(b, tcpinfo::read, false, f);
}

/// `boundary` with the reading `read` makes (`exiting`: the last one); returns the reading.
fn boundary_with(
    b: &Backend,
    read: fn(c_int) -> Option<Sample>,
    exiting: bool,
    f: impl FnOnce(&mut Tracker<StmtKey>, Sample) -> Charges<StmtKey>,
) -> Option<Sample> {
    b.with_local(|local| {
        // SAFETY: from a hook or callback of this backend.
        if !unsafe { gucs::track_statements() } {
            local.stale = true;
            return None;
        }
        let sample = read(local.sock)?;
        if local.stale {
            local.stale = false;
            local.tracker.resync(sample);
        }
        let charges = f(&mut local.tracker, sample);
        apply(b, charges, &sample, exiting);
        Some(sample)
    })
    .flatten()
}

fn statement_key(queryid: u64) -> StmtKey {
    // SAFETY: plain reads of this backend's current role and database.
    let (role, db) = unsafe { (get_user_id(), pg_sys::MyDatabaseId) };
    StmtKey::new(Kind::Statement, u32::from(role), u32::from(db), queryid)
}

/// A top-level statement starts.
fn start(b: &Backend, queryid: u64) {
    if b.in_local() {
        // The key only once the socket is read: nothing of it when counting is off.
        boundary(b, |t, s| t.start(statement_key(queryid), s));
        b.set_in_statement(true);
    }
}

/// Charges and the reading go to this backend's pending charges (`statements::pending`:
/// no lock, no other process's memory), and from there to the shared table when they are
/// due or a new key finds no place. Without a slot, or at exit, straight to the table.
fn apply(b: &Backend, charges: Charges<StmtKey>, sample: &Sample, exiting: bool) {
    if charges.iter().all(Option::is_none) {
        return;
    }
    let now = now_us();
    let charges = charges.map(|c| c.and_then(|c| Some((key_of(c.target)?, c.figures))));
    let socket = Socket::from_sample(sample);
    let Some(id) = b.conn.get().and_then(|c| c.slot) else {
        stmtshm::write_all(|t, _| charge_all(t, &charges, now));
        return;
    };
    if exiting {
        stmtshm::flush_pending(&b.pending, id, |t, conns| {
            conns.update(id, socket);
            charge_all(t, &charges, now)
        });
        return;
    }
    let add = |p: &mut Pending, generation: u32| {
        if p.generation() != generation {
            // A reset since: what waited here was reset away.
            p.clear(generation);
        }
        if !p.fits(charges.iter().flatten().map(|(k, _)| k)) {
            return None;
        }
        for (k, f) in charges.iter().flatten() {
            p.add(*k, f, now);
        }
        p.set_socket(Some(socket));
        Some(p.due(now))
    };
    match stmtshm::pending_write(&b.pending, id.pos, add) {
        Some(Some(false)) | None => {}
        Some(Some(true)) => {
            stmtshm::flush_pending(&b.pending, id, |_, _| ());
        }
        Some(None) => {
            // No place for a new key: what waits goes to the table, then this.
            stmtshm::flush_pending(&b.pending, id, |_, _| ());
            stmtshm::pending_write(&b.pending, id.pos, add);
        }
    }
}

fn charge_all(
    t: &mut pg_netstat_core::statements::StatementTable<'_>,
    charges: &[Option<(StmtKey, Figures)>; 2],
    now: i64,
) {
    for (key, f) in charges.iter().flatten() {
        t.charge(*key, f, now);
    }
}

/// The row a charge goes to. The setup row belongs to the session's role and database
/// (MyProc's, set once the session exists); a backend that never got one charges no setup.
fn key_of(target: Target<StmtKey>) -> Option<StmtKey> {
    match target {
        Target::Statement(k) => Some(k),
        Target::Setup => {
            // SAFETY: MyProc is this backend's PGPROC, valid until after before_shmem_exit.
            let (role, db) = unsafe {
                let p = pg_sys::MyProc;
                if p.is_null() {
                    (0, 0)
                } else {
                    (u32::from((*p).roleId), u32::from((*p).databaseId))
                }
            };
            (role != 0).then(|| StmtKey::new(Kind::Setup, role, db, 0))
        }
    }
}

/// The statements' part of the log hook (`log_hook`). An ERROR that reaches the top
/// while no statement is running belongs to a statement that failed before it could
/// start: it becomes one, so its text (in) and its error message (out) are charged to it
/// and not to its neighbours. Nothing when the report comes from inside our own work:
/// this backend's state lent (`Backend::with_local` refuses) or the statements lock held by this
/// backend (a charge would wait for itself).
pub fn on_report(edata: &pg_sys::ErrorData) {
    if edata.elevel != pg_sys::PGERROR as i32 || stmtshm::held_by_me() {
        return;
    }
    backend(|b| {
        if !b.in_local() {
            return;
        }
        if !b.in_statement() {
            start(b, my_query_id());
        }
        b.set_in_statement(false);
    });
}
