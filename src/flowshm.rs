//! The flow table in shared memory: sized from `pg_netstat.max_flows` when the server
//! starts, behind an LWLock of its own so per-connection work never waits on the
//! interval history's lock. With `max_flows = 0` nothing is allocated and flows are off.

use crate::region::{Part, Placer, Region, Zeroable};
use pg_netstat_core::flows::{index, Flow, FlowTable, FlowView, Header, Owner, Totals, TOTALS_ROWS};
use pgrx::pg_sys;

const SHMEM_NAME: &std::ffi::CStr = c"pg_netstat flows";
const TRANCHE: &std::ffi::CStr = c"pg_netstat_flows";
/// Flows copied per hold of the shared lock by `snapshot_flows`.
const SNAPSHOT_CHUNK: usize = 1024;

/// The region's parts.
struct Layout {
    header: Part<Header>,
    index: Part<u32>,
    flows: Part<Flow>,
    owner_index: Part<u32>,
    owners: Part<Owner>,
    roles: Part<Totals>,
    databases: Part<Totals>,
}

// SAFETY: (each of these) plain data, no pointer; all-zero is a valid value: an unused place, a
// zero count, OwnerStatus::Unknown and BackendKind::Unknown (both 0).
unsafe impl Zeroable for Header {}
// SAFETY: as above.
unsafe impl Zeroable for Flow {}
// SAFETY: as above.
unsafe impl Zeroable for Owner {}
// SAFETY: as above.
unsafe impl Zeroable for Totals {}

static FLOWS: Region<Layout> = Region::new();

fn layout(capacity: usize, owners_capacity: usize) -> (Layout, usize) {
    let mut p = Placer::new();
    let l = Layout {
        header: p.place(1),
        index: p.place(index::len_for(capacity)),
        flows: p.place(capacity),
        owner_index: p.place(index::len_for(owners_capacity)),
        owners: p.place(owners_capacity),
        roles: p.place(TOTALS_ROWS),
        databases: p.place(TOTALS_ROWS),
    };
    (l, p.total())
}

/// Reserves the flow table (nothing when `capacity` is 0: flows off).
///
/// # Safety
/// From _PG_init only, once.
pub unsafe fn init(capacity: usize) {
    if capacity == 0 {
        return;
    }
    // SAFETY: plain reads of settings already loaded from postgresql.conf (_PG_init).
    let backends = unsafe { (pg_sys::MaxConnections + pg_sys::max_wal_senders).max(0) as usize };
    // Every backend that can exist at once has a place for its record, and as many
    // records of ended backends as there are flows that may still need them.
    let (l, size) = layout(capacity, capacity + backends);
    // SAFETY: by the caller's promise.
    unsafe { FLOWS.reserve(l, size, SHMEM_NAME, TRANCHE, set_capacity) };
}

/// All-zero bytes are a valid empty table but for its capacity and its indexes' hash
/// secret, drawn here, once per creation (each server start and crash restart).
fn set_capacity(base: *mut u8) {
    // SAFETY: called by the startup hook with this region, just created.
    unsafe {
        FLOWS.on_create(base, |l, mut x| {
            let header = x.one(l.header);
            header.capacity = l.flows.len() as u32;
            header.hash_key = pg_netstat_core::flows::HashKey::random();
        })
    };
}

pub fn enabled() -> bool {
    FLOWS.exists()
}

/// Whether this backend holds the flows lock (a report emitted from inside `write`).
pub fn held_by_me() -> bool {
    FLOWS.held_by_me()
}

/// Runs `f` on the table under the exclusive lock; `None` when flows are off. Callers
/// keep `f` bounded (one ring block, one sweep budget, one registration): the lock is
/// what every new connection's authentication waits for.
pub fn write<R>(f: impl FnOnce(&mut FlowTable<'_>) -> R) -> Option<R> {
    FLOWS.write(|l, mut x| {
        f(&mut FlowTable {
            header: x.one(l.header),
            index: x.part(l.index),
            flows: x.part(l.flows),
            owner_index: x.part(l.owner_index),
            owners: x.part(l.owners),
            roles: x.part(l.roles),
            databases: x.part(l.databases),
        })
    })
}

/// Runs `f` on a read-only view of the table under the shared lock; `None` when flows
/// are off. Keep `f` short: the worker waits for it.
pub fn read<R>(f: impl FnOnce(&FlowView<'_>) -> R) -> Option<R> {
    read_flows(0..0, |v| f(v))
}

/// Like `read`, with only the flows in `range` (clamped to the table) in the view.
fn read_flows<R>(range: std::ops::Range<usize>, f: impl FnOnce(&FlowView<'_>) -> R) -> Option<R> {
    FLOWS.read(|l, s| {
        let flows = s.part(l.flows);
        let (start, end) = (range.start.min(flows.len()), range.end.min(flows.len()));
        f(&FlowView {
            header: s.one(l.header),
            flows: &flows[start..end.max(start)],
            roles: s.part(l.roles),
            databases: s.part(l.databases),
        })
    })
}

/// Every flow in use, copied `SNAPSHOT_CHUNK` places per hold of the shared lock so a
/// large table never holds the worker up for long. A flow keeps its place while it
/// lives, so each flow that lives through the copy is in it exactly once; flows that
/// begin or end meanwhile may or may not be.
pub fn snapshot_flows() -> Vec<Flow> {
    let Some(capacity) = FLOWS.layout().filter(|_| enabled()).map(|l| l.flows.len()) else { return Vec::new() };
    let mut out = Vec::new();
    for start in (0..capacity).step_by(SNAPSHOT_CHUNK) {
        read_flows(start..start + SNAPSHOT_CHUNK, |v| out.extend(v.flows.iter().filter(|f| f.in_use).copied()));
    }
    out
}
