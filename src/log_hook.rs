//! The extension's one `emit_log_hook`, installed once in _PG_init and chained to the
//! hook installed before it. Each part looks at the report for what it cares about: the
//! statements (an ERROR before a statement could start), the connection owners (a
//! refused login's FATAL), the settings (a hint for a value PostgreSQL could not read).
//! A report can be emitted from inside our own work; so no part takes an LWLock this
//! backend already holds (it would wait for itself), and the statements' part does
//! nothing while this backend's statement state is in use (`stmt_hooks`).

use crate::{gucs, owner_hooks, stmt_hooks};
use pgrx::pg_sys;

// Registration at _PG_init: written there once, in the postmaster, before any child
// exists; only read afterwards.
static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

/// Installs the hook.
///
/// # Safety
/// From _PG_init only, once.
pub unsafe fn install() {
    // SAFETY: by the caller's promise: hook chaining, single-threaded, before any
    // backend exists.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(on_report);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_report(edata: *mut pg_sys::ErrorData) {
    // The checkpointer, the background writer, the WAL writer: no code of ours runs in
    // them but this, at their first report (`net_raw`). Nothing to report an error to.
    let _ = crate::net_raw::drop_here();
    if !edata.is_null() {
        // SAFETY: PostgreSQL passes the report being emitted, valid for this call and
        // ours to change (as log hooks may), in the memory context it is built in.
        unsafe {
            stmt_hooks::on_report(&*edata);
            owner_hooks::on_report(&*edata);
            gucs::on_report(&mut *edata);
        }
    }
    // SAFETY: the hook installed before ours, with the same argument.
    unsafe {
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            prev(edata);
        }
    }
}
