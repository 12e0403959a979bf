//! The state the worker publishes and SQL reads: per device, the last `HISTORY` closed
//! intervals and the capture status. Fixed size, plain data, behind one named LWLock.

use crate::capture::{MAX_DEVICES, MAX_DEVICE_NAME};
use crate::counters::{Counters, TcpCounters};
use crate::stats::Closed;
use pgrx::atomics::PgAtomic;
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, pg_sys};
use std::sync::atomic::{AtomicBool, AtomicI32};

/// Closed intervals kept per device (the original keeps 60 too).
pub const HISTORY: usize = 60;
const NAME_BYTES: usize = MAX_DEVICE_NAME + 1;
const ERROR_BYTES: usize = 256;

#[repr(C)]
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Interval start, Unix seconds.
    pub start: i64,
    pub secs: u32,
    pub counters: Counters,
    /// Packets the kernel dropped on this device (ring full), charged to the interval
    /// in which the worker learned of them.
    pub kernel_drops: u64,
    pub late: u64,
    /// When the interval was published, Unix microseconds.
    pub created_at_us: i64,
    pub tcp: TcpCounters,
}

pub use crate::device::DeviceState;

#[repr(C)]
#[derive(Copy, Clone)]
pub struct DeviceEntry {
    pub in_use: bool,
    name: [u8; NAME_BYTES],
    pub state: DeviceState,
    /// CaptureMethod in use (or configured, when not capturing).
    pub method: u8,
    /// Index of the oldest slot; `len` slots follow it (mod HISTORY).
    head: u32,
    len: u32,
    slots: [Slot; HISTORY],
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

    pub fn push(&mut self, closed: &Closed, created_at_us: i64) {
        let slot = Slot {
            start: closed.start,
            secs: closed.secs,
            counters: closed.counters,
            kernel_drops: closed.drops,
            late: closed.late,
            created_at_us,
            tcp: closed.tcp,
        };
        // A restarted worker after a clock step back could close an interval that is
        // already here: fold it into the newest row rather than show time going back.
        if self.len > 0 {
            let newest = (self.head as usize + self.len as usize - 1) % HISTORY;
            let last = &mut self.slots[newest];
            if slot.start <= last.start {
                last.counters.merge(&slot.counters);
                last.kernel_drops += slot.kernel_drops;
                last.late += slot.late;
                last.tcp.add(&slot.tcp);
                return;
            }
        }
        if (self.len as usize) < HISTORY {
            self.slots[(self.head as usize + self.len as usize) % HISTORY] = slot;
            self.len += 1;
        } else {
            self.slots[self.head as usize] = slot;
            self.head = (self.head + 1) % HISTORY as u32;
        }
    }

    pub fn history(&self) -> impl Iterator<Item = &Slot> + '_ {
        (0..self.len as usize).map(move |i| &self.slots[(self.head as usize + i) % HISTORY])
    }
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct NetstatShared {
    pub devices: [DeviceEntry; MAX_DEVICES],
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
        let pos = self.devices.iter().position(|d| d.in_use && d.name() == name);
        let pos = match pos {
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
        };
        Some(&mut self.devices[pos])
    }

    pub fn entry(&self, name: &str) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| d.in_use && d.name() == name)
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

// SAFETY (STATE, INJECT_ERROR and WORKER_PID): each name is this extension's own, and pg_shmem_init! in
// _PG_init (preload only) places the value in shared memory before any process uses it.
pub static STATE: PgLwLock<NetstatShared> = unsafe { PgLwLock::new(c"pg_netstat") };

/// Set by `pg_netstat_inject_worker_error()`; the worker raises an ERROR when it sees it.
/// An atomic, not under the lock, because the worker checks it on every wake-up.
pub static INJECT_ERROR: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_netstat_inject_error") };

/// PID of the running capture worker; 0 while none runs (before it starts, and from its
/// exit until the next one starts). An atomic: the worker clears it as it exits.
pub static WORKER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_netstat_worker_pid") };

pub fn init() {
    pg_shmem_init!(STATE);
    pg_shmem_init!(INJECT_ERROR);
    pg_shmem_init!(WORKER_PID);
}
