//! The hooks that find statement boundaries: executor and utility (top level only,
//! nesting as pg_stat_statements tracks it), and the (sub)transaction callbacks that
//! keep the nesting right when an error unwinds it.

use super::*;

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
    pub(super) fn get_user_id() -> pg_sys::Oid;
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

// The callbacks and hooks below are not #[pg_guard] (see the declarations above): our
// own work in them runs in `guarded`, and what runs outside it cannot panic.

pub(super) unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE) {
        guarded(|| {
            backend(|b| b.with_nesting(Nesting::xact_end));
        });
    }
}

pub(super) unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    let change: fn(&mut Nesting, u32) = match event {
        SUBXACT_EVENT_START_SUB => Nesting::sub_start,
        SUBXACT_EVENT_COMMIT_SUB => Nesting::sub_commit,
        SUBXACT_EVENT_ABORT_SUB => Nesting::sub_abort,
        _ => return,
    };
    guarded(|| {
        backend(|b| b.with_nesting(|n| change(n, my_subid)));
    });
}

/// Enters a nesting level (cannot panic: a borrow refused is a level not counted).
fn enter() {
    backend(|b| b.with_nesting(Nesting::enter));
}

fn leave() {
    backend(|b| b.with_nesting(Nesting::leave));
}

pub(super) unsafe extern "C-unwind" fn executor_start(qd: *mut pg_sys::QueryDesc, eflags: c_int) {
    // A parallel worker, another extension's background worker: its first statement is
    // the first code of ours it runs (`net_raw`).
    let _ = crate::net_raw::drop_here();
    // u64 in 15 to 17, i64 from 18: the same bits.
    // SAFETY: PostgreSQL passes a valid QueryDesc with its PlannedStmt.
    #[allow(clippy::unnecessary_cast)]
    let queryid = unsafe { (*(*qd).plannedstmt).queryId } as u64;
    guarded(|| {
        backend(|b| {
            if b.nesting_level() == 0 {
                start(b, queryid);
            }
        });
    });
    // SAFETY: the previous hook or the standard function, with our arguments.
    unsafe {
        match PREV_EXECUTOR_START {
            Some(prev) => prev(qd, eflags),
            None => standard_executor_start(qd, eflags),
        }
    }
}

#[cfg(not(feature = "pg18"))]
pub(super) unsafe extern "C-unwind" fn executor_run(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    enter();
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(qd, direction, count, execute_once),
            None => standard_executor_run(qd, direction, count, execute_once),
        }
    }
    leave();
}

#[cfg(feature = "pg18")]
pub(super) unsafe extern "C-unwind" fn executor_run(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
) {
    enter();
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(qd, direction, count),
            None => standard_executor_run(qd, direction, count),
        }
    }
    leave();
}

pub(super) unsafe extern "C-unwind" fn executor_finish(qd: *mut pg_sys::QueryDesc) {
    enter();
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_FINISH {
            Some(prev) => prev(qd),
            None => standard_executor_finish(qd),
        }
    }
    leave();
}

pub(super) unsafe extern "C-unwind" fn executor_end(qd: *mut pg_sys::QueryDesc) {
    backend(|b| {
        if b.nesting_level() == 0 {
            b.set_in_statement(false);
        }
    });
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_END {
            Some(prev) => prev(qd),
            None => standard_executor_end(qd),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let _ = crate::net_raw::drop_here();
    // SAFETY: PostgreSQL passes a valid PlannedStmt for a utility statement.
    #[allow(clippy::unnecessary_cast)]
    let (node, queryid) = unsafe { ((*pstmt).utilityStmt, (*pstmt).queryId as u64) };
    // SAFETY: a node pointer from the PlannedStmt (NULL-safe).
    let execute = unsafe { pgrx::is_a(node, pg_sys::NodeTag::T_ExecuteStmt) };
    let top = !execute && backend(|b| b.nesting_level() == 0 && b.in_local()).unwrap_or(false);
    let copy_in = top && is_copy_from_stdin(node);
    if top {
        // pg_stat_statements zeroes a utility statement's query id before it calls the
        // hooks installed before its own (it measures utilities itself); the id parse
        // analysis reported for pg_stat_activity is the same one. That report is made
        // once per query string, so with pg_stat_statements listed after pg_netstat in
        // shared_preload_libraries, a utility statement after the first of a
        // multi-statement string gets the first one's id.
        let queryid = if queryid != 0 { queryid } else { my_query_id() };
        guarded(|| {
            backend(|b| start(b, queryid));
        });
    }
    // EXECUTE adds no level: the statement it runs is the top-level one, as in
    // pg_stat_statements, so the two have the same query id.
    if !execute {
        enter();
    }
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => standard_process_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        }
    }
    if !execute {
        leave();
    }
    if top {
        guarded(|| {
            backend(|b| {
                if copy_in {
                    // A COPY FROM STDIN ended: its data is its own.
                    boundary(b, |t, s| t.finish(s));
                }
                b.set_in_statement(false);
            });
        });
    }
}

/// The query id this backend reported for its current query string (0 before parse
/// analysis gave it one).
pub(super) fn my_query_id() -> u64 {
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
