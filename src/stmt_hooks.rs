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

thread_local! {
    // A backend's own state: PostgreSQL runs a backend on one thread, so a thread-local
    // is the process's. Each is reached only through the functions below, which lend it
    // for one call and refuse a hook that runs while it is lent (an error reported in the
    // middle of our own work): nothing is ever reachable twice at once, and no hook
    // waits or panics for it.
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
    /// This backend's connection in the per-connection figures (client backends and
    /// walsenders on TCP); `None` elsewhere.
    static CONN: Cell<Option<ConnLocal>> = const { Cell::new(None) };
    static NESTING: RefCell<Nesting> = RefCell::new(Nesting::default());
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

/// Runs `f` on this backend's statement nesting; `None` when it is lent already.
fn with_nesting<R>(f: impl FnOnce(&mut Nesting) -> R) -> Option<R> {
    NESTING.try_with(|n| n.try_borrow_mut().ok().map(|mut n| f(&mut n))).ok().flatten()
}

/// The nesting level (0: top level; when lent already, as if nested: nothing starts).
fn nesting_level() -> i32 {
    with_nesting(|n| n.level()).unwrap_or(i32::MAX)
}

// PostgreSQL's own functions, declared here without pgrx's guard: through pgrx's
// bindings an ERROR would come back as a Rust panic and be raised again by pgrx with
// less than it had (no cursor position, message id, table or constraint name). The
// hooks below hold nothing that needs dropping while these run, so an ERROR's longjmp
// may pass through them as through C frames.
unsafe extern "C-unwind" {
    #[link_name = "standard_ExecutorStart"]
    fn standard_executor_start(qd: *mut pg_sys::QueryDesc, eflags: c_int);
    #[cfg(not(feature = "pg18"))]
    #[link_name = "standard_ExecutorRun"]
    fn standard_executor_run(
        qd: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        once: bool,
    );
    #[cfg(feature = "pg18")]
    #[link_name = "standard_ExecutorRun"]
    fn standard_executor_run(qd: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64);
    /// The current role: a read of two globals, which cannot raise an ERROR (called once
    /// per statement, where pgrx's guard would cost a sigsetjmp).
    #[link_name = "GetUserId"]
    fn get_user_id() -> pg_sys::Oid;
    #[link_name = "standard_ExecutorFinish"]
    fn standard_executor_finish(qd: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ExecutorEnd"]
    fn standard_executor_end(qd: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE) {
        with_nesting(Nesting::xact_end);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_START_SUB => {
            with_nesting(|n| n.sub_start(my_subid));
        }
        SUBXACT_EVENT_COMMIT_SUB => {
            with_nesting(|n| n.sub_commit(my_subid));
        }
        SUBXACT_EVENT_ABORT_SUB => {
            with_nesting(|n| n.sub_abort(my_subid));
        }
        _ => {}
    }
}

/// Called when authentication succeeded: a TCP client backend starts counting; any
/// other connection (Unix socket, walsender) never does.
///
/// # Safety
/// `port` is NULL or this backend's Port (the authentication hook's), which lives as
/// long as the backend.
pub unsafe fn authenticated(port: *const pg_sys::libpq::be::Port) {
    // SAFETY: a plain read of a flag set before authentication; `port` by the caller's
    // promise, `sock` its first field in every major.
    let (walsender, sock) = unsafe { (pg_sys::am_walsender, if port.is_null() { -1 } else { (*port).sock }) };
    if sock < 0 {
        return;
    }
    let Some(sample) = tcpinfo::read(sock) else { return };
    // SAFETY: by the caller's promise.
    unsafe { open_connection(port, sock, walsender, &sample) };
    if walsender {
        return;
    }
    let mut tracker = Tracker::new();
    let on = gucs::TRACK_STATEMENTS.get();
    if on {
        tracker.authenticated(sample);
    }
    let local = Local { tracker, sock, in_statement: false, stale: !on };
    let _ = LOCAL.try_with(|l| l.try_borrow_mut().map(|mut l| *l = Some(local)));
    // The exit callback is registered once, here.
    // An on_shmem_exit callback: it runs after every before_shmem_exit one, so after
    // ShutdownPostgres has ended the session's transaction and released its locks (the
    // server's FIN, which the exit sends, must not reach a client before that), and,
    // registered after InitProcess's, before ProcKill: this backend's PGPROC, and so its
    // LWLocks, are still there.
    // SAFETY: PostgreSQL's callback registration, in the backend, once per backend.
    unsafe {
        pg_sys::on_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

/// Takes this connection's slot in the per-connection figures, with its first reading.
///
/// # Safety
/// As `authenticated`.
unsafe fn open_connection(port: *const pg_sys::libpq::be::Port, sock: c_int, walsender: bool, sample: &Sample) {
    if !gucs::TRACK_STATEMENTS.get() {
        return;
    }
    // SAFETY: by the caller's promise.
    let Some(p) = (unsafe { owner_hooks::describe(port as *const _) }) else { return };
    let kind = if walsender { BackendKind::WalSender } else { BackendKind::Client };
    let key = AppKey {
        role: p.role,
        database: p.database,
        application: p.application,
        peer_class: peer::classify(&p.client_addr, p.ipv6) as u8,
        kind: kind as u8,
    };
    let conn = Conn {
        // SAFETY: a plain read of this process's PID.
        pid: unsafe { pg_sys::MyProcPid },
        key,
        client_addr: p.client_addr,
        ipv6: p.ipv6,
        client_port: p.client_port,
        started_us: now_us(),
        socket: Socket::from_sample(sample),
        ..Conn::default()
    };
    let slot = stmtshm::open_slot(conn);
    let _ = CONN.try_with(|c| c.set(Some(ConnLocal { key, sock, slot })));
    if walsender {
        // Client backends close theirs in `on_exit`, after the last statement's charge.
        // SAFETY: PostgreSQL's callback registration, in the backend, once.
        unsafe { pg_sys::before_shmem_exit(Some(on_walsender_exit), pg_sys::Datum::from(0)) };
    }
}

fn conn_local() -> Option<ConnLocal> {
    CONN.try_with(Cell::get).ok().flatten()
}

/// The connection ends: its figures go to the totals. `last` is the final reading, if one
/// was taken (counting off: the latest in the slot stands).
fn close_connection(last: Option<Sample>) {
    let Some(c) = conn_local() else { return };
    let last = last.map(|s| Socket::from_sample(&s));
    stmtshm::write_all(|_, conns| conns.close(c.slot, &c.key, last));
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_walsender_exit(_code: c_int, _arg: pg_sys::Datum) {
    let Some(c) = conn_local() else { return };
    let last = if gucs::TRACK_STATEMENTS.get() { tcpinfo::read_final(c.sock) } else { None };
    close_connection(last);
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Reads the socket and lets `f` turn the reading into charges, which go to shared
/// memory. Nothing when this backend does not count, or counting is off.
fn boundary(f: impl FnOnce(&mut Tracker<StmtKey>, pg_netstat_core::statements::Sample) -> Charges<StmtKey>) {
    boundary_with(tcpinfo::read, false, f);
}

/// `boundary` with the reading `read` makes (`exiting`: the last one); returns the reading.
fn boundary_with(
    read: fn(c_int) -> Option<pg_netstat_core::statements::Sample>,
    exiting: bool,
    f: impl FnOnce(&mut Tracker<StmtKey>, pg_netstat_core::statements::Sample) -> Charges<StmtKey>,
) -> Option<Sample> {
    with_local(|local| {
        if !gucs::TRACK_STATEMENTS.get() {
            local.stale = true;
            return None;
        }
        let sample = read(local.sock)?;
        if local.stale {
            local.stale = false;
            local.tracker.resync(sample);
        }
        let charges = f(&mut local.tracker, sample);
        apply(charges, &sample, exiting);
        Some(sample)
    })
    .flatten()
}

fn set_in_statement(v: bool) {
    with_local(|l| l.in_statement = v);
}

fn in_statement() -> bool {
    with_local(|l| l.in_statement).unwrap_or(false)
}

fn statement_key(queryid: u64) -> StmtKey {
    // SAFETY: plain reads of this backend's current role and database.
    let (role, db) = unsafe { (get_user_id(), pg_sys::MyDatabaseId) };
    StmtKey::new(Kind::Statement, u32::from(role), u32::from(db), queryid)
}

/// A top-level statement starts.
fn start(queryid: u64) {
    if in_local() {
        // The key only once the socket is read: nothing of it when counting is off.
        boundary(|t, s| t.start(statement_key(queryid), s));
        set_in_statement(true);
    }
}

fn in_local() -> bool {
    with_local(|_| ()).is_some()
}

/// Runs `f` on this backend's state; `None` when it has none (not a client backend on
/// TCP), or when the state is lent already: a hook of ours that runs from inside our own
/// work (an error reported meanwhile) does nothing rather than reach it twice.
fn with_local<R>(f: impl FnOnce(&mut Local) -> R) -> Option<R> {
    LOCAL.try_with(|l| l.try_borrow_mut().ok()?.as_mut().map(f)).ok().flatten()
}

/// Charges and the reading go to this backend's pending charges (`statements::pending`:
/// no lock, no other process's memory), and from there to the shared table when they are
/// due or a new key finds no place. Without a slot, or at exit, straight to the table.
fn apply(charges: Charges<StmtKey>, sample: &Sample, exiting: bool) {
    if charges.iter().all(Option::is_none) {
        return;
    }
    let now = now_us();
    let charges = charges.map(|c| c.and_then(|c| Some((key_of(c.target)?, c.figures))));
    let socket = Socket::from_sample(sample);
    let Some(id) = conn_local().and_then(|c| c.slot) else {
        stmtshm::write_all(|t, _| charge_all(t, &charges, now));
        return;
    };
    if exiting {
        stmtshm::flush_pending(id, |t, conns| {
            conns.update(id, socket);
            charge_all(t, &charges, now)
        });
        return;
    }
    let add = |p: &mut Pending, generation: u32| {
        if p.generation != generation {
            // A reset since: what waited here was reset away.
            p.clear(generation);
        }
        if !p.fits(charges.iter().flatten().map(|(k, _)| k)) {
            return None;
        }
        for (k, f) in charges.iter().flatten() {
            p.add(*k, f, now);
        }
        p.socket = Some(socket);
        Some(p.due(now))
    };
    match stmtshm::pending_write(id.pos, add) {
        Some(Some(false)) | None => {}
        Some(Some(true)) => {
            stmtshm::flush_pending(id, |_, _| ());
        }
        Some(None) => {
            // No place for a new key: what waits goes to the table, then this.
            stmtshm::flush_pending(id, |_, _| ());
            stmtshm::pending_write(id.pos, add);
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

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: c_int, _arg: pg_sys::Datum) {
    let last = boundary_with(read_at_exit, true, |t, s| t.exit(s));
    // Counting off now, or nothing left to charge: what waits still goes to the table.
    if let Some(id) = conn_local().and_then(|c| c.slot) {
        stmtshm::flush_pending(id, |_, _| ());
    }
    close_connection(last);
}

/// The last reading. When nothing more can go to the client (it sent Terminate or
/// closed: whereToSendOutput is no longer DestRemote), the server ends its side first,
/// as PostgreSQL would a moment later, and then waits for the client's answer:
/// PostgreSQL's TLS close (its close_notify alert, which socket_close would otherwise
/// send from an on_proc_exit callback, after this reading, when shared memory is gone),
/// then the server's FIN, then at most EXIT_WAIT for the client's FIN or reset, then the
/// reading (`tcpinfo::read_at_end`). So a client that waits for the server to close
/// before it closes (asyncpg; over TLS it answers the alert with its own) is answered at
/// once, and a client that is slow to send its last record and FIN (a busy machine) is
/// still counted to its last byte. libpq, pgJDBC and node-postgres close at once: their
/// FIN is usually in already and the wait ends at once.
/// After a FATAL error (pg_terminate_backend, a timeout) messages may still go out during
/// exit, so nothing is ended early: the reading is the socket as it is, and the TLS
/// alert is left to socket_close, uncounted.
fn read_at_exit(fd: c_int) -> Option<pg_netstat_core::statements::Sample> {
    // SAFETY: plain reads of this backend's globals; MyProcPort is valid until the
    // process ends.
    let (port, closing) = unsafe {
        let port = pg_sys::libpq::be::MyProcPort;
        (port, !port.is_null() && pg_sys::whereToSendOutput != pg_sys::CommandDest::DestRemote)
    };
    if !closing {
        return tcpinfo::read_final(fd);
    }
    // SAFETY: secure_close only ends the TLS session of this backend's Port (nothing
    // without one), and socket_close's own call is then a no-op.
    tcpinfo::read_at_end(fd, || unsafe { secure_close(port) }, EXIT_WAIT)
}

/// The longest an exiting backend waits for the client's FIN after its own (the server's
/// side is closed by then: no client waits on this). Only a client that keeps its socket
/// open after Terminate meets it; the backend keeps its process slot (and its row in
/// pg_stat_activity) meanwhile, its transaction ended and its locks released already.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

unsafe extern "C-unwind" {
    /// PostgreSQL's own end of a TLS session (SSL_shutdown, which sends the close_notify
    /// alert, then SSL_free); nothing without TLS, nothing when called again.
    #[link_name = "secure_close"]
    fn secure_close(port: *mut pg_sys::libpq::be::Port);
}

/// A top-level statement starts (guarded: an error in our own work is reported by pgrx).
#[pgrx::pg_guard]
extern "C-unwind" fn on_start(queryid: u64) {
    start(queryid);
}

/// A COPY FROM STDIN ended: its data is its own.
#[pgrx::pg_guard]
extern "C-unwind" fn on_copy_in_end() {
    boundary(|t, s| t.finish(s));
}

// The hooks are not #[pg_guard]: see the declarations above. What they do themselves
// before and after the call down the chain cannot panic, or is in a guarded function.

unsafe extern "C-unwind" fn executor_start(qd: *mut pg_sys::QueryDesc, eflags: c_int) {
    if nesting_level() == 0 && in_local() {
        // u64 in 15 to 17, i64 from 18: the same bits.
        // SAFETY: PostgreSQL passes a valid QueryDesc with its PlannedStmt.
        #[allow(clippy::unnecessary_cast)]
        let queryid = unsafe { (*(*qd).plannedstmt).queryId } as u64;
        on_start(queryid);
    }
    // SAFETY: the previous hook or the standard function, with our arguments.
    unsafe {
        match PREV_EXECUTOR_START {
            Some(prev) => prev(qd, eflags),
            None => standard_executor_start(qd, eflags),
        }
    }
}

#[cfg(not(feature = "pg18"))]
unsafe extern "C-unwind" fn executor_run(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    with_nesting(Nesting::enter);
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(qd, direction, count, execute_once),
            None => standard_executor_run(qd, direction, count, execute_once),
        }
    }
    with_nesting(Nesting::leave);
}

#[cfg(feature = "pg18")]
unsafe extern "C-unwind" fn executor_run(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
) {
    with_nesting(Nesting::enter);
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(qd, direction, count),
            None => standard_executor_run(qd, direction, count),
        }
    }
    with_nesting(Nesting::leave);
}

unsafe extern "C-unwind" fn executor_finish(qd: *mut pg_sys::QueryDesc) {
    with_nesting(Nesting::enter);
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_FINISH {
            Some(prev) => prev(qd),
            None => standard_executor_finish(qd),
        }
    }
    with_nesting(Nesting::leave);
}

unsafe extern "C-unwind" fn executor_end(qd: *mut pg_sys::QueryDesc) {
    if nesting_level() == 0 {
        set_in_statement(false);
    }
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_END {
            Some(prev) => prev(qd),
            None => standard_executor_end(qd),
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a valid PlannedStmt for a utility statement.
    #[allow(clippy::unnecessary_cast)]
    let (node, queryid) = unsafe { ((*pstmt).utilityStmt, (*pstmt).queryId as u64) };
    // SAFETY: a node pointer from the PlannedStmt (NULL-safe).
    let execute = unsafe { pgrx::is_a(node, pg_sys::NodeTag::T_ExecuteStmt) };
    let top = nesting_level() == 0 && !execute && in_local();
    let copy_in = top && is_copy_from_stdin(node);
    if top {
        // pg_stat_statements zeroes a utility statement's query id before it calls the
        // hooks installed before its own (it measures utilities itself); the id parse
        // analysis reported for pg_stat_activity is the same one. That report is made
        // once per query string, so with pg_stat_statements listed after pg_netstat in
        // shared_preload_libraries, a utility statement after the first of a
        // multi-statement string gets the first one's id.
        on_start(if queryid != 0 { queryid } else { my_query_id() });
    }
    // EXECUTE adds no level: the statement it runs is the top-level one, as in
    // pg_stat_statements, so the two have the same query id.
    if !execute {
        with_nesting(Nesting::enter);
    }
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => standard_process_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        }
    }
    if !execute {
        with_nesting(Nesting::leave);
    }
    if top {
        if copy_in {
            on_copy_in_end();
        }
        set_in_statement(false);
    }
}

/// The query id this backend reported for its current query string (0 before parse
/// analysis gave it one).
fn my_query_id() -> u64 {
    // SAFETY: a plain read of this backend's own activity entry.
    #[allow(clippy::unnecessary_cast)]
    let id = unsafe { pg_sys::pgstat_get_my_query_id() } as u64;
    id
}

/// COPY ... FROM STDIN: its data arrives while it runs.
fn is_copy_from_stdin(node: *mut pg_sys::Node) -> bool {
    // SAFETY: a utility statement's parse tree; the tag says it is a CopyStmt.
    unsafe {
        pgrx::is_a(node, pg_sys::NodeTag::T_CopyStmt) && {
            let c = node as *const pg_sys::CopyStmt;
            (*c).is_from && (*c).filename.is_null() && !(*c).is_program
        }
    }
}

/// The statements' part of the log hook (`log_hook`). An ERROR that reaches the top
/// while no statement is running belongs to a statement that failed before it could
/// start: it becomes one, so its text (in) and its error message (out) are charged to it
/// and not to its neighbours. Nothing when the report comes from inside our own work:
/// this backend's state lent (`with_local` refuses) or the statements lock held by this
/// backend (a charge would wait for itself).
pub fn on_report(edata: &pg_sys::ErrorData) {
    if edata.elevel != pg_sys::PGERROR as i32 || stmtshm::held_by_me() || !in_local() {
        return;
    }
    if !in_statement() {
        start(my_query_id());
    }
    set_in_statement(false);
}
