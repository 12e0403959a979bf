//! Shared memory regions whose size is known only when the server starts (from a
//! setting), which pgrx's fixed-type `PgLwLock<T>` cannot hold: requested in the
//! postmaster's shmem_request_hook, placed in its shmem_startup_hook, all-zero when first
//! created, optionally with an LWLock of their own. Each is reserved once, in _PG_init.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::ptr::null_mut;

/// AddinShmemInitLock's place in MainLWLockArray (lwlocklist.h: the same on 15 to 18).
const ADDIN_SHMEM_INIT_LOCK: usize = 21;
const MAX_REGIONS: usize = 3;

#[derive(Clone, Copy)]
pub struct Spec {
    /// The region's name in PostgreSQL's shared memory index.
    pub name: &'static CStr,
    pub size: usize,
    /// A named LWLock tranche of one lock for the region, if it needs its own lock.
    pub tranche: Option<&'static CStr>,
    /// Fills in what all-zero bytes do not say, when the region is first created.
    pub on_create: fn(*mut u8),
}

#[derive(Clone, Copy)]
struct Placed {
    spec: Spec,
    base: *mut u8,
    lock: *mut pg_sys::LWLock,
}

/// Which reserved region.
#[derive(Clone, Copy, Debug)]
pub struct RegionId(usize);

// Written only in the postmaster (_PG_init and the startup hook), before any child
// exists; children inherit them and only read.
static mut REGIONS: [Option<Placed>; MAX_REGIONS] = [None; MAX_REGIONS];
static mut HOOKED: bool = false;
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Reserves a region; call from _PG_init only (in the postmaster, single-threaded).
pub fn reserve(spec: Spec) -> RegionId {
    // SAFETY: _PG_init runs once, single-threaded, in the postmaster, before the hooks
    // below run and before any child process exists.
    unsafe {
        #[allow(static_mut_refs)]
        let i = REGIONS.iter().position(Option::is_none).expect("more shared memory regions than MAX_REGIONS");
        REGIONS[i] = Some(Placed { spec, base: null_mut(), lock: null_mut() });
        if !HOOKED {
            HOOKED = true;
            PREV_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(on_request);
            PREV_STARTUP = pg_sys::shmem_startup_hook;
            pg_sys::shmem_startup_hook = Some(on_startup);
        }
        RegionId(i)
    }
}

fn placed(id: RegionId) -> Option<Placed> {
    // SAFETY: written only in the postmaster before any child exists (see REGIONS).
    unsafe { std::ptr::read(&raw const REGIONS)[id.0] }
}

/// The region's first byte; null until shared memory is set up.
pub fn base(id: RegionId) -> *mut u8 {
    placed(id).map_or(null_mut(), |p| p.base)
}

/// The region's own lock; null when it has none or before shared memory is set up.
pub fn lock(id: RegionId) -> *mut pg_sys::LWLock {
    placed(id).map_or(null_mut(), |p| p.lock)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_request() {
    // SAFETY: the hook chain PostgreSQL calls once in the postmaster, where shared
    // memory requests are accepted.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        #[allow(static_mut_refs)]
        for p in REGIONS.iter().flatten() {
            pg_sys::RequestAddinShmemSpace(p.spec.size);
            if let Some(t) = p.spec.tranche {
                pg_sys::RequestNamedLWLockTranche(t.as_ptr(), 1);
            }
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    // SAFETY: runs in the postmaster while shared memory is set up (and in EXEC_BACKEND
    // children), under AddinShmemInitLock as every extension does; each region is ours
    // by its name.
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        #[allow(static_mut_refs)]
        for p in REGIONS.iter_mut().flatten() {
            let mut found = false;
            let base = pg_sys::ShmemInitStruct(p.spec.name.as_ptr(), p.spec.size, &mut found) as *mut u8;
            if !found {
                std::ptr::write_bytes(base, 0, p.spec.size);
                (p.spec.on_create)(base);
            }
            p.base = base;
            if let Some(t) = p.spec.tranche {
                p.lock = &raw mut (*pg_sys::GetNamedLWLockTranche(t.as_ptr())).lock;
            }
        }
        pg_sys::LWLockRelease(init_lock);
    }
}
