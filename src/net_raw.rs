//! CAP_NET_RAW: only the capture worker uses it. The postmaster keeps it permitted only
//! (children start without it in effect, programs they run never get it), because Linux
//! gives a forked process its parent's permitted set and the worker, forked again after
//! every crash, must be able to raise it. Every other process drops it for good at the
//! first point PostgreSQL runs code of ours in it: a client backend in the
//! authentication hook, before anything its client can make it do; a parallel worker or
//! another extension's background worker at its first statement (the executor and
//! utility hooks); the checkpointer, background writer and the like at the first report
//! they emit (the log hook). What remains, and why: docs/security.md. No other
//! capability is touched. Linux-native builds only: the portable build changes no
//! privilege and says so in the log.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// This process has dropped it, or is one that keeps it: nothing more to do here.
static SETTLED: AtomicBool = AtomicBool::new(false);

/// In the postmaster, from _PG_init, before it opens its listen sockets (which may need
/// CAP_NET_BIND_SERVICE, left alone): CAP_NET_RAW permitted only.
pub fn restrict_postmaster() {
    #[cfg(linux_native)]
    if let Err(e) = pg_netstat_core::privileges::postmaster_keep_net_raw_permitted_only() {
        warning!("pg_netstat: could not restrict CAP_NET_RAW in the postmaster: {e}");
    }
    #[cfg(not(linux_native))]
    log!(
        "pg_netstat: this build (libpcap only, no Linux capability handling) does not restrict capture \
         privileges: every server process keeps whatever privilege the server was started with"
    );
}

/// Drops CAP_NET_RAW in this process for good, the first time it is called here; then
/// nothing (one atomic read). Never in the postmaster or the capture worker. The error
/// is returned once, for a caller that can report it (the log hook cannot).
pub fn drop_here() -> std::io::Result<()> {
    if SETTLED.load(Ordering::Relaxed) {
        return Ok(());
    }
    match keeper() {
        // Not settled: what the postmaster's memory holds, every child it forks starts
        // with.
        Some(Keeper::Postmaster) => return Ok(()),
        Some(Keeper::Worker) => {
            SETTLED.store(true, Ordering::Relaxed);
            return Ok(());
        }
        None => {}
    }
    SETTLED.store(true, Ordering::Relaxed);
    #[cfg(linux_native)]
    return pg_netstat_core::privileges::drop_net_raw();
    #[cfg(not(linux_native))]
    Ok(())
}

/// The processes that keep it.
enum Keeper {
    /// It forks the worker.
    Postmaster,
    /// The capture worker: it raises it.
    Worker,
}

fn keeper() -> Option<Keeper> {
    // SAFETY: plain reads of this process's globals: whether it is a child of the
    // postmaster, and the background worker entry it was started for (set before the
    // worker runs any code of its own, NULL in other processes).
    unsafe {
        if !pg_sys::IsUnderPostmaster {
            return Some(Keeper::Postmaster);
        }
        let w = pg_sys::MyBgworkerEntry;
        if !w.is_null() {
            let name = std::ffi::CStr::from_ptr((*w).bgw_function_name.as_ptr());
            if name.to_bytes() == crate::worker::MAIN_FUNCTION.to_bytes() {
                return Some(Keeper::Worker);
            }
        }
    }
    None
}
