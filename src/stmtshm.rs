//! The statement table and the backends' per-connection figures in shared memory: sized
//! from `pg_netstat.max_statements` and `max_connections` + `max_wal_senders` at server
//! start, behind an LWLock of their own. Backends take it at statement boundaries; the
//! capture worker only to copy the table for a save and once to load it, never while it
//! captures.

use crate::flows::index;
use crate::region::{self, RegionId};
use crate::statements::conns::{AppRow, Conn, ConnHeader, Conns, APP_ROWS};
use crate::statements::table::{self, Row, TableCounters};
use crate::statements::{Entry, Header, StatementTable};
use pgrx::pg_sys;
use std::mem::{align_of, size_of};
use std::ptr::null_mut;

const SHMEM_NAME: &std::ffi::CStr = c"pg_netstat statements";
const TRANCHE: &std::ffi::CStr = c"pg_netstat_statements";

#[derive(Clone, Copy)]
struct Layout {
    capacity: usize,
    index: usize,
    entries: usize,
    /// The backends' own per-connection figures (`statements::conns`), under the same lock.
    conn_header: usize,
    slots: usize,
    slot_count: usize,
    apps: usize,
    total: usize,
}

fn place<T>(at: &mut usize, n: usize) -> usize {
    let start = at.next_multiple_of(align_of::<T>().max(8));
    *at = start + n * size_of::<T>();
    start
}

fn layout(capacity: usize, slot_count: usize) -> Layout {
    let mut at = size_of::<Header>();
    let index = place::<u32>(&mut at, index::len_for(capacity));
    let entries = place::<Entry>(&mut at, capacity);
    let conn_header = place::<ConnHeader>(&mut at, 1);
    let slots = place::<Conn>(&mut at, slot_count);
    let apps = place::<AppRow>(&mut at, APP_ROWS);
    Layout { capacity, index, entries, conn_header, slots, slot_count, apps, total: at }
}

// Set once in the postmaster (_PG_init) and inherited by every child.
static mut LAYOUT: Option<Layout> = None;
static mut REGION_ID: Option<RegionId> = None;

/// Reserves the table, with `connections` slots for live TCP backends (max_connections
/// + max_wal_senders: no more can authenticate); call from _PG_init.
pub fn init(capacity: usize, connections: usize) {
    let l = layout(capacity.max(1), connections.max(1));
    // SAFETY: _PG_init runs once, single-threaded, in the postmaster.
    unsafe {
        LAYOUT = Some(l);
        REGION_ID = Some(region::reserve(region::Spec {
            name: SHMEM_NAME,
            size: l.total,
            tranche: Some(TRANCHE),
            on_create: set_capacity,
        }));
    }
}

fn set_capacity(base: *mut u8) {
    if let Some(l) = current_layout() {
        // SAFETY: `base` is the new region, at least `l.total` bytes, starting with the Header.
        unsafe { (*(base as *mut Header)).capacity = l.capacity as u32 };
    }
}

fn current_layout() -> Option<Layout> {
    // SAFETY: written once in _PG_init, in the postmaster, before any child exists.
    unsafe { std::ptr::read(&raw const LAYOUT) }
}

fn region_id() -> Option<RegionId> {
    // SAFETY: as above.
    unsafe { std::ptr::read(&raw const REGION_ID) }
}

fn region_base() -> *mut u8 {
    region_id().map_or(null_mut(), region::base)
}

struct Held(*mut pg_sys::LWLock);

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: made right after acquiring this lock; runs on unwinding too, so the lock
        // is released before PostgreSQL's abort cleanup.
        unsafe { pg_sys::LWLockRelease(self.0) }
    }
}

fn with<R>(mode: pg_sys::LWLockMode::Type, f: impl FnOnce(StatementTable<'_>, Conns<'_>) -> R) -> Option<R> {
    let l = current_layout()?;
    let base = region_base();
    let lock = region_id().map_or(null_mut(), region::lock);
    if base.is_null() || lock.is_null() {
        return None;
    }
    // SAFETY: the lock was set up with the region.
    unsafe { pg_sys::LWLockAcquire(lock, mode) };
    let _held = Held(lock);
    // SAFETY: the region holds the layout computed at start. Under the exclusive lock
    // nobody else touches it; under the shared lock callers only read (`read` hands out
    // a shared reference).
    let t = unsafe {
        StatementTable {
            header: &mut *(base as *mut Header),
            index: std::slice::from_raw_parts_mut(base.add(l.index) as *mut u32, index::len_for(l.capacity)),
            entries: std::slice::from_raw_parts_mut(base.add(l.entries) as *mut Entry, l.capacity),
        }
    };
    // SAFETY: as above; the three parts do not overlap (`layout`).
    let c = unsafe {
        Conns {
            header: &mut *(base.add(l.conn_header) as *mut ConnHeader),
            slots: std::slice::from_raw_parts_mut(base.add(l.slots) as *mut Conn, l.slot_count),
            apps: std::slice::from_raw_parts_mut(base.add(l.apps) as *mut AppRow, APP_ROWS),
        }
    };
    Some(f(t, c))
}

/// Runs `f` on the table and the per-connection figures under the exclusive lock (one
/// lock for both); `None` before shared memory exists. Keep `f` bounded: every backend's
/// statement boundary waits for it.
pub fn write_all<R>(f: impl FnOnce(&mut StatementTable<'_>, &mut Conns<'_>) -> R) -> Option<R> {
    with(pg_sys::LWLockMode::LW_EXCLUSIVE, |mut t, mut c| f(&mut t, &mut c))
}

/// Runs `f` on a read-only view under the shared lock.
pub fn read<R>(f: impl FnOnce(&Header, &[Entry]) -> R) -> Option<R> {
    with(pg_sys::LWLockMode::LW_SHARED, |t, _| f(t.header, t.entries))
}

/// Runs `f` on the per-connection figures, read-only, under the shared lock.
pub fn read_conns<R>(f: impl FnOnce(&ConnHeader, &[Conn], &[AppRow]) -> R) -> Option<R> {
    with(pg_sys::LWLockMode::LW_SHARED, |_, c| f(c.header, c.slots, c.apps))
}

/// The per-connection figures as `conns::totals` needs them, copied under the shared lock
/// (the overflow row first, then the rows and slots in use: a plain copy) so the grouping
/// is done after the lock is released, not while statement boundaries wait for it.
pub fn copy_conns() -> Option<(ConnHeader, Vec<Conn>, Vec<AppRow>)> {
    read_conns(|h, slots, apps| {
        let apps = apps.first().into_iter().chain(apps.iter().skip(1).filter(|r| r.in_use)).copied().collect();
        (*h, slots.iter().filter(|c| c.in_use).copied().collect(), apps)
    })
}

/// The table's rows and counters, for the saved file: the entries in use are copied
/// under the shared lock (a plain copy, nothing else), and turned into rows after it.
pub fn snapshot() -> Option<(Vec<Row>, TableCounters)> {
    let (header, entries) = read(|h, e| (*h, e.iter().filter(|x| x.in_use).copied().collect::<Vec<Entry>>()))?;
    Some(table::snapshot(&header, &entries))
}

/// Puts saved rows and counters back (sorted here, before the lock is taken); returns how
/// many rows were folded into "other" rows because the table is now smaller.
pub fn restore(mut rows: Vec<Row>, counters: &TableCounters) -> Option<u64> {
    table::restore_order(&mut rows);
    write_all(|t, _| t.restore(&rows, counters))
}
