//! The statement table and the backends' per-connection figures in shared memory: sized
//! from `pg_netstat.max_statements` and `max_connections` + `max_wal_senders` at server
//! start, behind an LWLock of their own. Backends take it at statement boundaries; the
//! capture worker only to copy the table for a save and once to load it, never while it
//! captures.

use crate::flows::index;
use crate::region::{self, RegionId};
use crate::statements::conns::{AppRow, Conn, ConnHeader, Conns, SlotId, APP_ROWS};
use crate::statements::pending::{self, Pending, PendingEntry};
use crate::statements::table::{self, Row, TableCounters};
use crate::statements::{Entry, Header, StatementTable};
use pgrx::pg_sys;
use std::cell::UnsafeCell;
use std::mem::{align_of, size_of, MaybeUninit};
use std::ptr::null_mut;
use std::sync::atomic::{fence, AtomicU32, Ordering};

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
    /// Each slot's pending charges (`statements::pending`), written by its backend alone,
    /// without the lock.
    pending_header: usize,
    pending: usize,
    total: usize,
}

/// Bumped by pg_netstat_reset(): pending charges of an older generation were reset away.
#[repr(C)]
struct PendingHeader {
    generation: AtomicU32,
}

/// One backend's pending charges behind a sequence counter, odd while the backend writes
/// them: a reader copies them (under the shared lock, which the backend does not take to
/// write them) and keeps the copy only if the counter was even and unchanged across it.
/// The backend moves them into the table under the exclusive lock, so no reader sees
/// them both there and here.
#[repr(C)]
struct PendingSlot {
    changes: AtomicU32,
    body: UnsafeCell<Pending>,
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
    let pending_header = place::<PendingHeader>(&mut at, 1);
    let pending = place::<PendingSlot>(&mut at, slot_count);
    Layout { capacity, index, entries, conn_header, slots, slot_count, apps, pending_header, pending, total: at }
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
        REGION_ID =
            Some(region::reserve(region::Spec { name: SHMEM_NAME, size: l.total, tranche: Some(TRANCHE), on_create }));
    }
}

fn on_create(base: *mut u8) {
    if let Some(l) = current_layout() {
        // SAFETY: `base` is the new region, at least `l.total` bytes, starting with the
        // Header; no other process uses it yet.
        unsafe {
            (*(base as *mut Header)).capacity = l.capacity as u32;
            for i in 0..l.slot_count {
                let p = pending_slot(base, &l, i);
                std::ptr::write((*p).body.get(), Pending::default());
            }
        }
    }
}

/// Slot `i`'s pending charges. Caller: `i < l.slot_count` and `base` the region of `l`.
unsafe fn pending_slot(base: *mut u8, l: &Layout, i: usize) -> *const PendingSlot {
    // SAFETY: within the region (`layout`), by the caller's promise.
    unsafe { (base.add(l.pending) as *const PendingSlot).add(i) }
}

fn generation(base: *mut u8, l: &Layout) -> u32 {
    // SAFETY: the region's PendingHeader; an atomic, written under the exclusive lock.
    unsafe { (*(base.add(l.pending_header) as *const PendingHeader)).generation.load(Ordering::Acquire) }
}

/// Runs `f` on this backend's own pending charges (slot `pos`, which it holds) with the
/// current reset generation; `None` before shared memory exists. Only the slot's holder
/// may call it: it writes without the lock.
pub fn pending_write<R>(pos: u32, f: impl FnOnce(&mut Pending, u32) -> R) -> Option<R> {
    let l = current_layout()?;
    let base = region_base();
    if base.is_null() || pos as usize >= l.slot_count {
        return None;
    }
    let generation = generation(base, &l);
    // SAFETY: slot `pos` is in the region; its body is written by this process alone
    // (the holder), readers copy it only as `pending_read` says.
    unsafe {
        let p = &*pending_slot(base, &l, pos as usize);
        let c = p.changes.load(Ordering::Relaxed);
        p.changes.store(c.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let r = f(&mut *p.body.get(), generation);
        p.changes.store(c.wrapping_add(2), Ordering::Release);
        Some(r)
    }
}

/// A copy of slot `i`'s pending charges, or `None` when its backend kept writing them
/// (it cannot while it waits for the lock; a process killed mid-write would leave the
/// counter odd until the crash restart that follows): a reader never waits on a backend.
/// Caller: as `pending_slot`.
unsafe fn pending_read(base: *mut u8, l: &Layout, i: usize) -> Option<Pending> {
    // SAFETY: by the caller's promise.
    let p = unsafe { &*pending_slot(base, l, i) };
    for attempt in 0..1000 {
        let before = p.changes.load(Ordering::Acquire);
        if before & 1 == 0 {
            // SAFETY: a byte copy that may race with the holder's writes (as PostgreSQL's
            // st_changecount readers do), as bytes: it is taken for a Pending only if no
            // write overlapped it, and then holds what the holder wrote.
            let copy = unsafe { std::ptr::read_volatile(p.body.get() as *const MaybeUninit<Pending>) };
            fence(Ordering::Acquire);
            if p.changes.load(Ordering::Relaxed) == before {
                // SAFETY: no write overlapped the copy (the counter was even and unchanged).
                return Some(unsafe { copy.assume_init() });
            }
        }
        if attempt < 100 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    None
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
        (*h, live_slots(slots), apps)
    })
}

/// The table's rows and counters with every backend's pending charges added (the view,
/// the saved file): the entries in use and the pending charges are copied under the
/// shared lock (plain copies, nothing else), and turned into rows after it.
pub fn snapshot() -> Option<(Vec<Row>, TableCounters)> {
    let (header, entries, pending) = with(pg_sys::LWLockMode::LW_SHARED, |t, c| {
        let entries = t.entries.iter().filter(|x| x.in_use).copied().collect::<Vec<Entry>>();
        (*t.header, entries, pending_entries(&*c.slots))
    })?;
    let (mut rows, counters) = table::snapshot(&header, &entries);
    pending::merge(&mut rows, &pending);
    Some((rows, counters))
}

/// Copies of the pending charges of the current generation of every slot in use. Under
/// the lock (shared or exclusive).
fn pending_entries(slots: &[Conn]) -> Vec<PendingEntry> {
    let Some(l) = current_layout() else { return Vec::new() };
    let base = region_base();
    let generation = generation(base, &l);
    let mut out = Vec::new();
    for (i, _) in slots.iter().enumerate().filter(|(_, c)| c.in_use) {
        // SAFETY: `i` is a slot of this layout's region.
        if let Some(p) = unsafe { pending_read(base, &l, i) }.filter(|p| p.generation == generation) {
            out.extend_from_slice(p.entries());
        }
    }
    out
}

/// Copies of the slots in use, each with its backend's latest reading (which waits in its
/// pending charges until they go to the table). Under the lock.
fn live_slots(slots: &[Conn]) -> Vec<Conn> {
    let Some(l) = current_layout() else { return Vec::new() };
    let base = region_base();
    let mut out = Vec::new();
    for (i, c) in slots.iter().enumerate().filter(|(_, c)| c.in_use) {
        // SAFETY: `i` is a slot of this layout's region.
        let latest = unsafe { pending_read(base, &l, i) }.and_then(|p| p.socket);
        out.push(Conn { socket: latest.unwrap_or(c.socket), ..*c });
    }
    out
}

/// Moves this backend's pending charges (slot `id`, which it holds) into the table, its
/// latest reading into its slot, then runs `f` under the same exclusive lock.
pub fn flush_pending<R>(id: SlotId, f: impl FnOnce(&mut StatementTable<'_>, &mut Conns<'_>) -> R) -> Option<R> {
    write_all(|t, c| {
        pending_write(id.pos, |p, generation| {
            if p.generation == generation {
                for e in p.entries() {
                    t.charge_between(e.key, &e.figures, e.first_seen_us, e.last_seen_us);
                }
            }
            if let Some(s) = p.socket {
                c.update(id, s);
            }
            p.clear(generation);
        });
        f(t, c)
    })
}

/// Takes a slot for a backend's connection (`Conns::open`), with no pending charges.
pub fn open_slot(conn: Conn) -> Option<SlotId> {
    write_all(|_, c| {
        let id = c.open(conn)?;
        pending_write(id.pos, |p, generation| p.clear(generation));
        Some(id)
    })
    .flatten()
}

/// pg_netstat_reset() of the statement table and the per-connection totals: pending
/// charges become an older generation, and live connections count from their latest
/// reading, pending or not.
pub fn reset(now_us: i64) {
    write_all(|t, c| {
        if let Some(l) = current_layout() {
            let base = region_base();
            for (i, slot) in c.slots.iter_mut().enumerate().filter(|(_, s)| s.in_use) {
                // SAFETY: `i` is a slot of this layout's region.
                if let Some(s) = unsafe { pending_read(base, &l, i) }.and_then(|p| p.socket) {
                    slot.socket = s;
                }
            }
            // SAFETY: the region's PendingHeader; written only here, under the exclusive lock.
            unsafe {
                (*(base.add(l.pending_header) as *const PendingHeader)).generation.fetch_add(1, Ordering::AcqRel)
            };
        }
        t.reset(now_us);
        c.reset(now_us);
    });
}

/// Puts saved rows and counters back (sorted here, before the lock is taken); returns how
/// many rows were folded into "other" rows because the table is now smaller.
pub fn restore(mut rows: Vec<Row>, counters: &TableCounters) -> Option<u64> {
    table::restore_order(&mut rows);
    write_all(|t, _| t.restore(&rows, counters))
}
