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

#[pgrx::pg_guard]
pub(super) unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE) {
        with_nesting(Nesting::xact_end);
    }
}

#[pgrx::pg_guard]
pub(super) unsafe extern "C-unwind" fn on_subxact(
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

pub(super) unsafe extern "C-unwind" fn executor_start(qd: *mut pg_sys::QueryDesc, eflags: c_int) {
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
pub(super) unsafe extern "C-unwind" fn executor_run(
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
pub(super) unsafe extern "C-unwind" fn executor_run(
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

pub(super) unsafe extern "C-unwind" fn executor_finish(qd: *mut pg_sys::QueryDesc) {
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

pub(super) unsafe extern "C-unwind" fn executor_end(qd: *mut pg_sys::QueryDesc) {
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
