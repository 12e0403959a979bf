//! The flow table in shared memory: sized from `pg_netstat.max_flows` when the server
//! starts, behind an LWLock of its own so per-connection work never waits on the
//! interval history's lock. With `max_flows = 0` nothing is allocated and flows are off.

use crate::flows::{index, Flow, FlowTable, FlowView, Header, Owner, Totals, TOTALS_ROWS};
use crate::region::{self, RegionId};
use pgrx::pg_sys;
use std::mem::{align_of, size_of};
use std::ptr::null_mut;

const SHMEM_NAME: &std::ffi::CStr = c"pg_netstat flows";
const TRANCHE: &std::ffi::CStr = c"pg_netstat_flows";
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

// Set once in the postmaster (_PG_init) and inherited by every child.
static mut LAYOUT: Option<Layout> = None;
static mut REGION_ID: Option<RegionId> = None;

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
        let l = layout(capacity, capacity + backends);
        LAYOUT = Some(l);
        REGION_ID = Some(region::reserve(region::Spec {
            name: SHMEM_NAME,
            size: l.total,
            tranche: Some(TRANCHE),
            on_create: set_capacity,
        }));
    }
}

/// All-zero bytes are a valid empty table but for its capacity.
fn set_capacity(base: *mut u8) {
    if let Some(l) = current_layout() {
        // SAFETY: `base` is the new region, at least `l.total` bytes, starting with the Header.
        unsafe { (*(base as *mut Header)).capacity = l.capacity as u32 };
    }
}

fn region_base() -> *mut u8 {
    // SAFETY: written once in _PG_init, in the postmaster, before any child exists.
    unsafe { std::ptr::read(&raw const REGION_ID) }.map_or(null_mut(), region::base)
}

/// Flows were asked for (max_flows > 0); true from _PG_init on, before the memory exists.
pub fn configured() -> bool {
    // SAFETY: written once in _PG_init, in the postmaster, before any child exists.
    current_layout().is_some()
}

pub fn enabled() -> bool {
    !region_base().is_null()
}

struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: only created right after acquiring the lock. Unwinding (a Rust panic, or a
        // PostgreSQL ERROR that pgrx turns into one) drops it too, so the lock is
        // released on every path before PostgreSQL's own abort cleanup runs.
        unsafe { pg_sys::LWLockRelease(region_lock()) }
    }
}

fn lock(mode: pg_sys::LWLockMode::Type) -> Held {
    // SAFETY: the lock was set up with the region (enabled() is checked by every caller).
    unsafe { pg_sys::LWLockAcquire(region_lock(), mode) };
    Held
}

fn region_lock() -> *mut pg_sys::LWLock {
    // SAFETY: as in region_base.
    unsafe { std::ptr::read(&raw const REGION_ID) }.map_or(null_mut(), region::lock)
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
    let region = region_base();
    // SAFETY: the region holds the layout computed at start; the exclusive lock keeps every
    // other process out while these slices exist. They stay inside the region.
    let mut t = unsafe {
        FlowTable {
            header: &mut *(region as *mut Header),
            index: std::slice::from_raw_parts_mut(region.add(l.index) as *mut u32, index::len_for(l.capacity)),
            flows: std::slice::from_raw_parts_mut(region.add(l.flows) as *mut Flow, l.capacity),
            owner_index: std::slice::from_raw_parts_mut(
                region.add(l.owner_index) as *mut u32,
                index::len_for(l.owners_capacity),
            ),
            owners: std::slice::from_raw_parts_mut(region.add(l.owners) as *mut Owner, l.owners_capacity),
            roles: std::slice::from_raw_parts_mut(region.add(l.roles) as *mut Totals, TOTALS_ROWS),
            databases: std::slice::from_raw_parts_mut(region.add(l.databases) as *mut Totals, TOTALS_ROWS),
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
    let region = region_base();
    // SAFETY: as in `write`; under the shared lock nobody writes while these shared
    // references exist.
    let v = unsafe {
        FlowView {
            header: &*(region as *const Header),
            flows: std::slice::from_raw_parts((region.add(l.flows) as *const Flow).add(start), end.max(start) - start),
            roles: std::slice::from_raw_parts(region.add(l.roles) as *const Totals, TOTALS_ROWS),
            databases: std::slice::from_raw_parts(region.add(l.databases) as *const Totals, TOTALS_ROWS),
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
