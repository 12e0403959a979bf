//! The flow table in shared memory: sized from `pg_netstat.max_flows` when the server
//! starts, behind an LWLock of its own so per-connection work never waits on the
//! interval history's lock. With `max_flows = 0` nothing is allocated and flows are off.

use crate::flows::{index, Flow, FlowTable, FlowView, Header, Owner, Totals, TOTALS_ROWS};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::mem::{align_of, size_of};
use std::ptr::null_mut;

const SHMEM_NAME: &std::ffi::CStr = c"pg_netstat flows";
const TRANCHE: &std::ffi::CStr = c"pg_netstat_flows";
/// AddinShmemInitLock's place in MainLWLockArray (lwlocklist.h: the same on 15 to 18).
const ADDIN_SHMEM_INIT_LOCK: usize = 21;
/// Flows copied per hold of the shared lock by `snapshot_flows`.
const SNAPSHOT_CHUNK: usize = 1024;

/// Where each part of the region starts, in bytes.
#[derive(Clone, Copy)]
struct Layout {
    capacity: usize,
    owners_capacity: usize,
    index: usize,
    flows: usize,
    owner_index: usize,
    owners: usize,
    roles: usize,
    databases: usize,
    total: usize,
}

fn place<T>(at: &mut usize, n: usize) -> usize {
    let start = at.next_multiple_of(align_of::<T>().max(8));
    *at = start + n * size_of::<T>();
    start
}

fn layout(capacity: usize, owners_capacity: usize) -> Layout {
    let mut at = size_of::<Header>();
    let index = place::<u32>(&mut at, index::len_for(capacity));
    let flows = place::<Flow>(&mut at, capacity);
    let owner_index = place::<u32>(&mut at, index::len_for(owners_capacity));
    let owners = place::<Owner>(&mut at, owners_capacity);
    let roles = place::<Totals>(&mut at, TOTALS_ROWS);
    let databases = place::<Totals>(&mut at, TOTALS_ROWS);
    Layout { capacity, owners_capacity, index, flows, owner_index, owners, roles, databases, total: at }
}

// Set once in the postmaster (startup hook) and inherited by every child.
static mut LAYOUT: Option<Layout> = None;
static mut REGION: *mut u8 = null_mut();
static mut LOCK: *mut pg_sys::LWLock = null_mut();

pub fn init(capacity: usize) {
    if capacity == 0 {
        return;
    }
    // SAFETY: _PG_init runs once, single-threaded, in the postmaster; the settings
    // read here are already loaded from postgresql.conf.
    unsafe {
        // Every backend that can exist at once has a place for its record, and as many
        // records of ended backends as there are flows that may still need them.
        let backends = (pg_sys::MaxConnections + pg_sys::max_wal_senders).max(0) as usize;
        LAYOUT = Some(layout(capacity, capacity + backends));
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_startup);
    }
}

unsafe fn request() {
    // SAFETY: called where PostgreSQL accepts shared memory requests.
    unsafe {
        #[allow(static_mut_refs)]
        if let Some(l) = LAYOUT {
            pg_sys::RequestAddinShmemSpace(l.total);
            pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
        }
    }
}

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

#[pg_guard]
unsafe extern "C-unwind" fn on_request() {
    // SAFETY: the hook chain PostgreSQL calls once in the postmaster.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        request();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    // SAFETY: runs in the postmaster while shared memory is set up, under
    // AddinShmemInitLock as every extension does; the region is ours by name.
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        #[allow(static_mut_refs)]
        let Some(l) = LAYOUT
        else {
            return;
        };
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), l.total, &mut found) as *mut u8;
        if !found {
            // All-zero bytes are a valid empty table: every type in it says so.
            std::ptr::write_bytes(p, 0, l.total);
            (*(p as *mut Header)).capacity = l.capacity as u32;
        }
        REGION = p;
        LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock;
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Flows were asked for (max_flows > 0); true from _PG_init on, before the memory exists.
pub fn configured() -> bool {
    // SAFETY: written once in _PG_init, in the postmaster, before any child exists.
    current_layout().is_some()
}

pub fn enabled() -> bool {
    // SAFETY: written once in the postmaster before any child exists.
    unsafe { !REGION.is_null() }
}

struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: only created right after acquiring LOCK. Unwinding (a Rust panic, or a
        // PostgreSQL ERROR that pgrx turns into one) drops it too, so the lock is
        // released on every path before PostgreSQL's own abort cleanup runs.
        unsafe { pg_sys::LWLockRelease(LOCK) }
    }
}

fn lock(mode: pg_sys::LWLockMode::Type) -> Held {
    // SAFETY: LOCK was set up with the region (enabled() is checked by every caller).
    unsafe { pg_sys::LWLockAcquire(LOCK, mode) };
    Held
}

fn current_layout() -> Option<Layout> {
    // SAFETY: written once in _PG_init, in the postmaster, before any child exists.
    unsafe { std::ptr::read(&raw const LAYOUT) }
}

/// Runs `f` on the table under the exclusive lock; `None` when flows are off. Callers
/// keep `f` bounded (one ring block, one sweep budget, one registration): the lock is
/// what every new connection's authentication waits for.
pub fn write<R>(f: impl FnOnce(&mut FlowTable<'_>) -> R) -> Option<R> {
    if !enabled() {
        return None;
    }
    let l = current_layout()?;
    let _held = lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
    // SAFETY: REGION holds the layout computed at start; the exclusive lock keeps every
    // other process out while these slices exist. They stay inside the region.
    let mut t = unsafe {
        FlowTable {
            header: &mut *(REGION as *mut Header),
            index: std::slice::from_raw_parts_mut(REGION.add(l.index) as *mut u32, index::len_for(l.capacity)),
            flows: std::slice::from_raw_parts_mut(REGION.add(l.flows) as *mut Flow, l.capacity),
            owner_index: std::slice::from_raw_parts_mut(
                REGION.add(l.owner_index) as *mut u32,
                index::len_for(l.owners_capacity),
            ),
            owners: std::slice::from_raw_parts_mut(REGION.add(l.owners) as *mut Owner, l.owners_capacity),
            roles: std::slice::from_raw_parts_mut(REGION.add(l.roles) as *mut Totals, TOTALS_ROWS),
            databases: std::slice::from_raw_parts_mut(REGION.add(l.databases) as *mut Totals, TOTALS_ROWS),
        }
    };
    Some(f(&mut t))
}

/// Runs `f` on a read-only view of the table under the shared lock; `None` when flows
/// are off. Keep `f` short: the worker waits for it.
pub fn read<R>(f: impl FnOnce(&FlowView<'_>) -> R) -> Option<R> {
    read_flows(0..0, |v| f(v))
}

/// Like `read`, with only the flows in `range` (clamped to the table) in the view.
fn read_flows<R>(range: std::ops::Range<usize>, f: impl FnOnce(&FlowView<'_>) -> R) -> Option<R> {
    if !enabled() {
        return None;
    }
    let l = current_layout()?;
    let (start, end) = (range.start.min(l.capacity), range.end.min(l.capacity));
    let _held = lock(pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: as in `write`; under the shared lock nobody writes while these shared
    // references exist.
    let v = unsafe {
        FlowView {
            header: &*(REGION as *const Header),
            flows: std::slice::from_raw_parts((REGION.add(l.flows) as *const Flow).add(start), end.max(start) - start),
            roles: std::slice::from_raw_parts(REGION.add(l.roles) as *const Totals, TOTALS_ROWS),
            databases: std::slice::from_raw_parts(REGION.add(l.databases) as *const Totals, TOTALS_ROWS),
        }
    };
    Some(f(&v))
}

/// Every flow in use, copied `SNAPSHOT_CHUNK` places per hold of the shared lock so a
/// large table never holds the worker up for long. A flow keeps its place while it
/// lives, so each flow that lives through the copy is in it exactly once; flows that
/// begin or end meanwhile may or may not be.
pub fn snapshot_flows() -> Vec<Flow> {
    let Some(l) = current_layout().filter(|_| enabled()) else { return Vec::new() };
    let mut out = Vec::new();
    for start in (0..l.capacity).step_by(SNAPSHOT_CHUNK) {
        read_flows(start..start + SNAPSHOT_CHUNK, |v| out.extend(v.flows.iter().filter(|f| f.in_use).copied()));
    }
    out
}
