//! The state the worker publishes and SQL reads: per device, the capture status, running
//! totals, and the last `pg_netstat.history` closed intervals. Plain data behind one named
//! LWLock: the status in a fixed-size struct, the rows in a region sized at server start
//! (`history` rows for each of the MAX_DEVICES places), reached through `exclusive()`
//! and `share()`, which hold the lock for both.

use crate::region::{self, RegionId};
use pg_netstat_core::capture::{MAX_DEVICES, MAX_DEVICE_NAME};
use pg_netstat_core::counters::Counters;
use pg_netstat_core::history::{Ring, Slot};
use pg_netstat_core::stats::Closed;
use pgrx::atomics::PgAtomic;
use pgrx::lwlock::{PgLwLock, PgLwLockExclusiveGuard, PgLwLockShareGuard};
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, pg_sys};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64};
use std::sync::OnceLock;

const NAME_BYTES: usize = MAX_DEVICE_NAME + 1;
const ERROR_BYTES: usize = 256;
const ROWS_NAME: &std::ffi::CStr = c"pg_netstat history";

pub use pg_netstat_core::device::DeviceState;

#[repr(C)]
#[derive(Copy, Clone)]
pub struct DeviceEntry {
    pub in_use: bool,
    name: [u8; NAME_BYTES],
    pub state: DeviceState,
    /// CaptureMethod in use (or configured, when not capturing).
    pub method: u8,
    /// Where this device's closed intervals are in its share of the history rows.
    pub ring: Ring,
    /// Unix microseconds of the last state change.
    pub state_since_us: i64,
    error: [u8; ERROR_BYTES],
    /// Totals since the worker started capturing this device.
    pub total: Counters,
    /// `total` at the last pg_netstat_reset(); the view shows the difference.
    pub total_base: Counters,
    pub kernel_drops: u64,
    /// Times the ring was full and the kernel had to wait for the worker.
    pub ring_freezes: u64,
}

impl DeviceEntry {
    pub fn name(&self) -> &str {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(NAME_BYTES);
        std::str::from_utf8(&self.name[..end]).unwrap_or("?")
    }

    pub fn last_error(&self) -> &str {
        let end = self.error.iter().position(|b| *b == 0).unwrap_or(ERROR_BYTES);
        std::str::from_utf8(&self.error[..end]).unwrap_or("")
    }

    pub fn set_error(&mut self, text: &str) {
        self.error = [0; ERROR_BYTES];
        // Cut on a character boundary so the stored text stays valid UTF-8.
        let mut n = text.len().min(ERROR_BYTES - 1);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.error[..n].copy_from_slice(&text.as_bytes()[..n]);
    }
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct NetstatShared {
    pub devices: [DeviceEntry; MAX_DEVICES],
    /// The saved file has been read (or found absent) in this shared memory's life: a
    /// worker restarted after an error must not load it again over what it counted.
    pub loaded: bool,
}

impl Default for NetstatShared {
    fn default() -> Self {
        // SAFETY: every field is an integer, a bool, a byte array or a fieldless enum
        // whose zero value (Starting) exists, so all-zero bytes are a valid value.
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: plain data with no pointers, fit to live in shared memory.
unsafe impl PGRXSharedMemory for NetstatShared {}

impl NetstatShared {
    /// The entry for `name`, creating it in a free place when needed. `None` only when
    /// all places are taken (cannot happen: the worker captures at most MAX_DEVICES).
    pub fn entry_mut(&mut self, name: &str) -> Option<&mut DeviceEntry> {
        let pos = self.place_mut(name)?;
        Some(&mut self.devices[pos])
    }

    /// The place of `name`'s entry, as `entry_mut`.
    fn place_mut(&mut self, name: &str) -> Option<usize> {
        let pos = self.devices.iter().position(|d| d.in_use && d.name() == name);
        Some(match pos {
            Some(p) => p,
            None => {
                let p = self.devices.iter().position(|d| !d.in_use)?;
                let e = &mut self.devices[p];
                // SAFETY: as in Default: all-zero is a valid DeviceEntry.
                *e = unsafe { std::mem::zeroed() };
                e.in_use = true;
                let n = name.len().min(NAME_BYTES - 1);
                e.name[..n].copy_from_slice(&name.as_bytes()[..n]);
                p
            }
        })
    }

    pub fn entry(&self, name: &str) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| d.in_use && d.name() == name)
    }

    /// A new worker takes over the devices in `keep` and forgets the rest. Until it has
    /// opened them they are `starting`, not whatever the worker before it left there.
    pub fn take_over(&mut self, keep: &[String], now_us: i64) {
        self.retain(keep);
        for d in self.devices.iter_mut().filter(|d| d.in_use) {
            d.state = DeviceState::Starting;
            d.state_since_us = now_us;
        }
    }

    /// Forgets every device not in `keep` (after a reload removed it from the list).
    pub fn retain(&mut self, keep: &[String]) {
        for d in self.devices.iter_mut() {
            if d.in_use && !keep.iter().any(|k| k == d.name()) {
                d.in_use = false;
            }
        }
    }
}

// SAFETY: (this static and the four below) each name is this extension's own, and
// pg_shmem_init! in _PG_init (preload only) places the value in shared memory before
// any process uses it.
pub static STATE: PgLwLock<NetstatShared> = unsafe { PgLwLock::new(c"pg_netstat") };

/// Set by `pg_netstat_inject_worker_error()`; the worker raises an ERROR when it sees it.
/// An atomic, not under the lock, because the worker checks it on every wake-up.
// SAFETY: as STATE\'s above.
pub static INJECT_ERROR: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_netstat_inject_error") };

/// Set by `pg_netstat_reset()`: the worker saves the state file at its next wake-up, so
/// a crash cannot bring back what was reset.
// SAFETY: as STATE\'s above.
pub static SAVE_REQUESTED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_netstat_save_requested") };

/// PID of the running capture worker; 0 while none runs (until a starting worker has
/// taken its devices over, and from its exit until the next one has). An atomic: the
/// worker clears it as it exits.
// SAFETY: as STATE\'s above.
pub static WORKER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_netstat_worker_pid") };

/// Unix microseconds of the last worker's exit: while none runs, its devices are shown
/// `stopped` since then. An atomic, so the exit path (after an error too) takes no lock.
// SAFETY: as STATE\'s above.
pub static WORKER_EXITED_US: PgAtomic<AtomicI64> = unsafe { PgAtomic::new(c"pg_netstat_worker_exited_us") };

/// The history rows' region and rows per device: set once in _PG_init, in the
/// postmaster, and inherited by every child. The rows are under STATE's lock.
static ROWS: OnceLock<(RegionId, usize)> = OnceLock::new();

/// Sets up shared memory: the state, and `history` rows for each of MAX_DEVICES devices.
///
/// # Safety
/// From _PG_init only, once.
pub unsafe fn init(history: usize) {
    let history = history.max(1);
    // SAFETY: by the caller's promise.
    let id = unsafe {
        region::reserve(region::Spec { name: ROWS_NAME, size: rows_bytes(history), tranche: None, on_create: |_| {} })
    };
    if ROWS.set((id, history)).is_err() {
        panic!("pg_netstat: shared memory set up twice");
    }
    pg_shmem_init!(STATE);
    pg_shmem_init!(INJECT_ERROR);
    pg_shmem_init!(WORKER_PID);
    pg_shmem_init!(WORKER_EXITED_US);
    pg_shmem_init!(SAVE_REQUESTED);
}

/// Shared memory taken by `history` rows for every device place.
pub fn rows_bytes(history: usize) -> usize {
    MAX_DEVICES * history * std::mem::size_of::<Slot>()
}

fn rows() -> (*mut Slot, usize) {
    match ROWS.get() {
        Some(&(id, per_device)) => (region::base(id) as *mut Slot, per_device),
        None => (std::ptr::null_mut(), 0),
    }
}

/// Closed intervals kept per device (`pg_netstat.history`, fixed at server start).
pub fn history_capacity() -> usize {
    rows().1
}

/// The state and the history rows under the state's exclusive lock.
pub struct Exclusive {
    guard: PgLwLockExclusiveGuard<'static, NetstatShared>,
    rows: *mut Slot,
    per_device: usize,
}

/// The same under the shared lock, for readers.
pub struct Shared {
    guard: PgLwLockShareGuard<'static, NetstatShared>,
    rows: *const Slot,
    per_device: usize,
}

pub fn exclusive() -> Exclusive {
    let guard = STATE.exclusive();
    let (rows, per_device) = rows();
    Exclusive { guard, rows, per_device }
}

pub fn share() -> Shared {
    let guard = STATE.share();
    let (rows, per_device) = rows();
    Shared { guard, rows: rows as *const Slot, per_device }
}

impl std::ops::Deref for Exclusive {
    type Target = NetstatShared;
    fn deref(&self) -> &NetstatShared {
        &self.guard
    }
}

impl std::ops::DerefMut for Exclusive {
    fn deref_mut(&mut self) -> &mut NetstatShared {
        &mut self.guard
    }
}

impl std::ops::Deref for Shared {
    type Target = NetstatShared;
    fn deref(&self) -> &NetstatShared {
        &self.guard
    }
}

impl Exclusive {
    /// Adds a row to the history of device `name` (creating its entry when needed).
    pub fn push(&mut self, name: &str, slot: Slot) {
        let (base, per_device) = (self.rows, self.per_device);
        let Some(place) = self.guard.place_mut(name) else { return };
        if base.is_null() {
            return;
        }
        // SAFETY: as in rows_of, mutably: the exclusive lock is held while `self` lives.
        let rows = unsafe { std::slice::from_raw_parts_mut(base.add(place * per_device), per_device) };
        self.guard.devices[place].ring.push(rows, slot);
    }

    /// Adds a closed interval published at `created_at_us`.
    pub fn push_closed(&mut self, name: &str, closed: &Closed, created_at_us: i64) {
        self.push(name, Slot::from_closed(closed, created_at_us));
    }
}

impl Shared {
    /// Device place `place`'s rows, for as long as the shared lock is held (`self`).
    fn rows_of(&self, place: usize) -> &[Slot] {
        if self.rows.is_null() || place >= MAX_DEVICES {
            return &[];
        }
        // SAFETY: the region holds MAX_DEVICES * per_device rows; the borrow of `self`
        // keeps the shared lock held while the slice lives, and writers take it exclusively.
        unsafe { std::slice::from_raw_parts(self.rows.add(place * self.per_device), self.per_device) }
    }

    /// Every device in use, with its rows oldest first.
    pub fn devices_with_history(&self) -> impl Iterator<Item = (&DeviceEntry, impl Iterator<Item = &Slot>)> + '_ {
        self.guard
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.in_use)
            .map(move |(place, d)| (d, d.ring.iter(self.rows_of(place))))
    }

    /// Every row of every device in use, device by device, oldest first.
    pub fn histories(&self) -> impl Iterator<Item = (&DeviceEntry, &Slot)> + '_ {
        self.devices_with_history().flat_map(|(d, rows)| rows.map(move |s| (d, s)))
    }
}
