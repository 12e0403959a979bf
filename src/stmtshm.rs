//! The statement table and the backends' per-connection figures in shared memory: sized
//! from `pg_netstat.max_statements` and `max_connections` + `max_wal_senders` at server
//! start, behind an LWLock of their own. Backends take it at statement boundaries; the
//! capture worker only to copy the table for a save and once to load it, never while it
//! captures.

use crate::region::{Exclusive, LockFree, LockFreePart, Part, Placer, Region, Zeroable};
use pg_netstat_core::flows::index;
use pg_netstat_core::statements::conns::{AppRow, Conn, ConnHeader, Conns, SlotId, APP_ROWS};
use pg_netstat_core::statements::pending::{self, Pending, PendingCell, PendingEntry};
use pg_netstat_core::statements::table::{self, Row, TableCounters};
use pg_netstat_core::statements::{Entry, Header, StatementTable};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};

const SHMEM_NAME: &std::ffi::CStr = c"pg_netstat statements";
const TRANCHE: &std::ffi::CStr = c"pg_netstat_statements";

/// The region's parts.
struct Layout {
    header: Part<Header>,
    index: Part<u32>,
    entries: Part<Entry>,
    /// The backends' own per-connection figures (`statements::conns`), under the same lock.
    conn_header: Part<ConnHeader>,
    slots: Part<Conn>,
    apps: Part<AppRow>,
    /// Bumped by pg_netstat_reset() (under the exclusive lock): pending charges of an
    /// older generation were reset away.
    generation: LockFreePart<AtomicU32>,
    /// One backend's pending charges each (`statements::seqcell`): the backend writes
    /// them without the lock; a reader copies them under the shared lock. The backend
    /// moves them into the table under the exclusive lock, so no reader sees them both
    /// there and here.
    pending: LockFreePart<PendingCell>,
}

// SAFETY: (each of these) plain data, no pointer; all-zero is a valid value (an unused entry or
// slot, zero counts, pending cells of no charges).
unsafe impl Zeroable for Header {}
// SAFETY: as above.
unsafe impl Zeroable for Entry {}
// SAFETY: as above.
unsafe impl Zeroable for ConnHeader {}
// SAFETY: as above.
unsafe impl Zeroable for Conn {}
// SAFETY: as above.
unsafe impl Zeroable for AppRow {}
// SAFETY: as above.
unsafe impl Zeroable for PendingCell {}
// SAFETY: a sequence counter and words, all atomics.
unsafe impl LockFree for PendingCell {}

static STATEMENTS: Region<Layout> = Region::new();

fn layout(capacity: usize, slot_count: usize) -> (Layout, usize) {
    let mut p = Placer::new();
    let l = Layout {
        header: p.place(1),
        index: p.place(index::len_for(capacity)),
        entries: p.place(capacity),
        conn_header: p.place(1),
        slots: p.place(slot_count),
        apps: p.place(APP_ROWS),
        generation: p.place_lock_free(1),
        pending: p.place_lock_free(slot_count),
    };
    (l, p.total())
}

/// Reserves the table, with `connections` slots for live TCP backends (max_connections
/// + max_wal_senders: no more can authenticate).
///
/// # Safety
/// From _PG_init only, once.
pub unsafe fn init(capacity: usize, connections: usize) {
    let (l, size) = layout(capacity.max(1), connections.max(1));
    // SAFETY: by the caller's promise.
    unsafe { STATEMENTS.reserve(l, size, SHMEM_NAME, TRANCHE, on_create) };
}

/// All-zero bytes are an empty table but for its capacity, and pending cells of no charges.
fn on_create(base: *mut u8) {
    // SAFETY: called by the startup hook with this region, just created.
    unsafe { STATEMENTS.on_create(base, |l, mut x| x.one(l.header).capacity = l.entries.len() as u32) };
}

/// Whether this backend holds the statements lock (a report emitted from inside a
/// `write_all`, `read` or `snapshot`).
pub fn held_by_me() -> bool {
    STATEMENTS.held_by_me()
}

/// The pending cells and the reset generation: atomics, used without the lock.
fn pending_cells() -> Option<(&'static [PendingCell], &'static AtomicU32)> {
    Some((STATEMENTS.lock_free(|l| l.pending)?, &STATEMENTS.lock_free(|l| l.generation)?[0]))
}

/// This backend's copy of what its pending cell holds (and the cell's slot): the cell's
/// one writer need not read it back, and writes only the words a charge changed. Kept
/// in the backend's state (`stmt_hooks`), lent to `pending_write` for one call.
pub struct MyPending(RefCell<Option<(u32, Pending)>>);

impl MyPending {
    pub const fn new() -> Self {
        MyPending(RefCell::new(None))
    }
}

/// Runs `f` on this backend's own pending charges (slot `pos`, which it holds) with the
/// current reset generation; `None` before shared memory exists. Only the slot's holder
/// calls it (it writes without the lock): a second writer at once could give readers a
/// mix of both writes, never undefined behaviour (`SeqCell`).
pub fn pending_write<R>(mine: &MyPending, pos: u32, f: impl FnOnce(&mut Pending, u32) -> R) -> Option<R> {
    let (cells, generation) = pending_cells()?;
    let generation = generation.load(Ordering::Acquire);
    let cell = cells.get(pos as usize)?;
    // Never lent twice (nothing in `f` writes pending charges); if it were, refuse
    // rather than write the cell behind the copy's back.
    let mut mine = mine.0.try_borrow_mut().ok()?;
    if mine.as_ref().is_none_or(|(p, _)| *p != pos) {
        // The slot's holder is the cell's one writer: its value is whole to read.
        *mine = Some((pos, cell.read()?));
    }
    let guard = ForgetOnUnwind(&mut mine);
    let (_, value) = guard.0.as_mut()?;
    Some(cell.update_from(value, |p: &mut Pending| f(p, generation)))
}

/// Drops the copy if `f` panicked: it may then hold changes the cell does not.
struct ForgetOnUnwind<'a>(&'a mut Option<(u32, Pending)>);

impl Drop for ForgetOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            *self.0 = None;
        }
    }
}

/// A copy of slot `i`'s pending charges, or `None` when its backend kept writing them
/// (it cannot while it waits for the lock; a process killed mid-write would leave the
/// counter odd until the crash restart that follows): a reader never waits on a backend.
fn pending_read(i: usize) -> Option<Pending> {
    pending_cells()?.0.get(i)?.read()
}

fn table<'a>(l: &Layout, x: &mut Exclusive<'a>) -> StatementTable<'a> {
    StatementTable { header: x.one(l.header), index: x.part(l.index), entries: x.part(l.entries) }
}

fn conns<'a>(l: &Layout, x: &mut Exclusive<'a>) -> Conns<'a> {
    Conns { header: x.one(l.conn_header), slots: x.part(l.slots), apps: x.part(l.apps) }
}

/// Runs `f` on the table and the per-connection figures under the exclusive lock (one
/// lock for both); `None` before shared memory exists. Keep `f` bounded: every backend's
/// statement boundary waits for it.
pub fn write_all<R>(f: impl FnOnce(&mut StatementTable<'_>, &mut Conns<'_>) -> R) -> Option<R> {
    STATEMENTS.write(|l, mut x| f(&mut table(l, &mut x), &mut conns(l, &mut x)))
}

/// Runs `f` on a read-only view under the shared lock.
pub fn read<R>(f: impl FnOnce(&Header, &[Entry]) -> R) -> Option<R> {
    STATEMENTS.read(|l, s| f(s.one(l.header), s.part(l.entries)))
}

/// Runs `f` on the per-connection figures, read-only, under the shared lock.
pub fn read_conns<R>(f: impl FnOnce(&ConnHeader, &[Conn], &[AppRow]) -> R) -> Option<R> {
    STATEMENTS.read(|l, s| f(s.one(l.conn_header), s.part(l.slots), s.part(l.apps)))
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
    let (header, entries, pending) = STATEMENTS.read(|l, s| {
        let entries = s.part(l.entries).iter().filter(|x| x.in_use).copied().collect::<Vec<Entry>>();
        (*s.one(l.header), entries, pending_entries(s.part(l.slots)))
    })?;
    let (mut rows, counters) = table::snapshot(&header, &entries);
    pending::merge(&mut rows, &pending);
    Some((rows, counters))
}

/// Copies of the pending charges of the current generation of every slot in use. Under
/// the lock (shared or exclusive).
fn pending_entries(slots: &[Conn]) -> Vec<PendingEntry> {
    let Some((_, generation)) = pending_cells() else { return Vec::new() };
    let generation = generation.load(Ordering::Acquire);
    let mut out = Vec::new();
    for (i, _) in slots.iter().enumerate().filter(|(_, c)| c.in_use) {
        if let Some(p) = pending_read(i).filter(|p| p.generation() == generation) {
            out.extend_from_slice(p.entries());
        }
    }
    out
}

/// Copies of the slots in use, each with its backend's latest reading (which waits in its
/// pending charges until they go to the table). Under the lock.
fn live_slots(slots: &[Conn]) -> Vec<Conn> {
    let mut out = Vec::new();
    for (i, c) in slots.iter().enumerate().filter(|(_, c)| c.in_use) {
        let latest = pending_read(i).and_then(|p| p.socket());
        out.push(Conn { socket: latest.unwrap_or(c.socket), ..*c });
    }
    out
}

/// Moves this backend's pending charges (slot `id`, which it holds) into the table, its
/// latest reading into its slot, then runs `f` under the same exclusive lock.
pub fn flush_pending<R>(
    mine: &MyPending,
    id: SlotId,
    f: impl FnOnce(&mut StatementTable<'_>, &mut Conns<'_>) -> R,
) -> Option<R> {
    write_all(|t, c| {
        pending_write(mine, id.pos, |p, generation| {
            if p.generation() == generation {
                for e in p.entries() {
                    t.charge_between(e.key, &e.figures, e.first_seen_us, e.last_seen_us);
                }
            }
            if let Some(s) = p.socket() {
                c.update(id, s);
            }
            p.clear(generation);
        });
        f(t, c)
    })
}

/// Takes a slot for a backend's connection (`Conns::open`), with no pending charges.
pub fn open_slot(mine: &MyPending, conn: Conn) -> Option<SlotId> {
    write_all(|_, c| {
        let id = c.open(conn)?;
        pending_write(mine, id.pos, |p, generation| p.clear(generation));
        Some(id)
    })
    .flatten()
}

/// pg_netstat_reset() of the statement table and the per-connection totals: pending
/// charges become an older generation, and live connections count from their latest
/// reading, pending or not.
pub fn reset(now_us: i64) {
    write_all(|t, c| {
        if let Some((_, generation)) = pending_cells() {
            for (i, slot) in c.slots.iter_mut().enumerate().filter(|(_, s)| s.in_use) {
                if let Some(s) = pending_read(i).and_then(|p| p.socket()) {
                    slot.socket = s;
                }
            }
            // Written only here, under the exclusive lock.
            generation.fetch_add(1, Ordering::AcqRel);
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
