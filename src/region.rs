//! Shared memory regions whose size is known only when the server starts (from a
//! setting), which pgrx's fixed-type `PgLwLock<T>` cannot hold: requested in the
//! postmaster's shmem_request_hook, placed in its shmem_startup_hook, all-zero when first
//! created, optionally with an LWLock of their own. Each is reserved once, in _PG_init.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

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

/// Which reserved region.
#[derive(Clone, Copy, Debug)]
pub struct RegionId(usize);

// Registration: written only in _PG_init, in the postmaster, before any child exists;
// children inherit them and only read.
static mut SPECS: [Option<Spec>; MAX_REGIONS] = [None; MAX_REGIONS];
static mut HOOKED: bool = false;
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;
// Where each region was placed and its lock, set by the startup hook (in the postmaster,
// before any child exists, and in EXEC_BACKEND children as each starts); null before.
static BASES: [AtomicPtr<u8>; MAX_REGIONS] = [const { AtomicPtr::new(null_mut()) }; MAX_REGIONS];
static LOCKS: [AtomicPtr<pg_sys::LWLock>; MAX_REGIONS] = [const { AtomicPtr::new(null_mut()) }; MAX_REGIONS];

/// Reserves a region.
///
/// # Safety
/// From _PG_init only (in the postmaster, single-threaded, before the hooks below run and
/// before any child process exists).
pub unsafe fn reserve(spec: Spec) -> RegionId {
    // SAFETY: by the caller's promise.
    unsafe {
        #[allow(static_mut_refs)]
        let i = SPECS.iter().position(Option::is_none).expect("more shared memory regions than MAX_REGIONS");
        SPECS[i] = Some(spec);
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

/// The region's first byte; null until shared memory is set up.
pub fn base(id: RegionId) -> *mut u8 {
    BASES[id.0].load(Ordering::Acquire)
}

/// The region's own lock; null when it has none or before shared memory is set up.
pub fn lock(id: RegionId) -> *mut pg_sys::LWLock {
    LOCKS[id.0].load(Ordering::Acquire)
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
        for spec in SPECS.iter().flatten() {
            pg_sys::RequestAddinShmemSpace(spec.size);
            if let Some(t) = spec.tranche {
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
        for (i, spec) in SPECS.iter().enumerate() {
            let Some(spec) = spec else { continue };
            let mut found = false;
            let base = pg_sys::ShmemInitStruct(spec.name.as_ptr(), spec.size, &mut found) as *mut u8;
            BASES[i].store(base, Ordering::Release);
            if let Some(t) = spec.tranche {
                LOCKS[i].store(&raw mut (*pg_sys::GetNamedLWLockTranche(t.as_ptr())).lock, Ordering::Release);
            }
            if !found {
                std::ptr::write_bytes(base, 0, spec.size);
                (spec.on_create)(base);
            }
        }
        pg_sys::LWLockRelease(init_lock);
    }
}

/// A type that may live in a region: all-zero bytes are a valid value of it (a region is
/// zeroed when created), and it holds no pointer (every process maps the region at its
/// own address). Implemented by each type a region holds.
///
/// # Safety
/// Implement only for types of which both hold.
pub unsafe trait Zeroable {}

// SAFETY: integers and atomics: zero is a value, no pointer.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for std::sync::atomic::AtomicU32 {}

/// A type whose every access is atomic, so any process may use it without the region's
/// lock while others do, through a shared reference.
///
/// # Safety
/// Implement only for types with no field that is not an atomic (or made of atomics).
pub unsafe trait LockFree: Zeroable + Sync {}

// SAFETY: an atomic.
unsafe impl LockFree for std::sync::atomic::AtomicU32 {}

/// One part of a region: `len` values of `T` from byte `start`, the `id`-th part placed.
pub struct Part<T> {
    start: usize,
    len: usize,
    id: u32,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Part<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Part<T> {}

impl<T> Part<T> {
    pub fn len(&self) -> usize {
        self.len
    }
}

/// A part every process uses without the lock (`Region::lock_free`); never lent mutably.
pub struct LockFreePart<T>(Part<T>);

impl<T> Clone for LockFreePart<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for LockFreePart<T> {}

/// Places a region's parts one after another, each aligned, none overlapping: the
/// layout computed once from the settings, in _PG_init.
pub struct Placer {
    at: usize,
    parts: u32,
}

/// Parts a region may have (`Exclusive` keeps which it lent as bits of a u64).
const MAX_PARTS: u32 = 64;

impl Placer {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Placer {
        Placer { at: 0, parts: 0 }
    }

    pub fn place<T: Zeroable>(&mut self, len: usize) -> Part<T> {
        assert!(self.parts < MAX_PARTS, "more than {MAX_PARTS} parts in a region");
        let start = self.at.next_multiple_of(align_of::<T>().max(8));
        self.at = start + len * size_of::<T>();
        self.parts += 1;
        Part { start, len, id: self.parts - 1, _t: PhantomData }
    }

    pub fn place_lock_free<T: LockFree>(&mut self, len: usize) -> LockFreePart<T> {
        LockFreePart(self.place(len))
    }

    /// The region's size so far.
    pub fn total(&self) -> usize {
        self.at
    }
}

/// A region of layout `L` (a struct of `Part`s): reserved once in _PG_init, then reached
/// only through `read` (shared references, under its lock in shared mode), `write`
/// (mutable references, under its lock in exclusive mode, each part lent once) and
/// `lock_free` (the parts whose every access is atomic, without the lock).
pub struct Region<L: 'static> {
    placed: OnceLock<(RegionId, L)>,
}

impl<L: Sync + Send + 'static> Region<L> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Region { placed: OnceLock::new() }
    }

    /// Reserves the region, `size` bytes laid out as `layout`, with an LWLock of its own.
    ///
    /// # Safety
    /// Only from _PG_init, in the postmaster (shared memory is requested there), and at
    /// most once per region; `size` covers every part of `layout`.
    pub unsafe fn reserve(
        &'static self,
        layout: L,
        size: usize,
        name: &'static CStr,
        tranche: &'static CStr,
        on_create: fn(*mut u8),
    ) {
        // SAFETY: by the caller's promise.
        let id = unsafe { reserve(Spec { name, size, tranche: Some(tranche), on_create }) };
        if self.placed.set((id, layout)).is_err() {
            panic!("shared memory region {name:?} reserved twice");
        }
    }

    /// The layout, from _PG_init on (before the memory exists too).
    pub fn layout(&self) -> Option<&L> {
        self.placed.get().map(|(_, l)| l)
    }

    fn placed(&self) -> Option<(&L, *mut u8, *mut pg_sys::LWLock)> {
        let (id, l) = self.placed.get()?;
        let (b, lock) = (base(*id), lock(*id));
        (!b.is_null() && !lock.is_null()).then_some((l, b, lock))
    }

    /// Whether this backend holds the region's lock (in either mode).
    pub fn held_by_me(&self) -> bool {
        // SAFETY: the region's own lock; LWLockHeldByMe only reads this backend's list.
        self.placed().is_some_and(|(_, _, lock)| unsafe { pg_sys::LWLockHeldByMe(lock) })
    }

    /// Whether the memory exists (after the postmaster's startup hook).
    pub fn exists(&self) -> bool {
        self.placed().is_some()
    }

    /// Runs `f` with shared references to the region's parts, under its lock in shared
    /// mode; `None` when the region does not exist.
    pub fn read<R>(&self, f: impl FnOnce(&L, Shared<'_>) -> R) -> Option<R> {
        let (l, base, lock) = self.placed()?;
        let _held = Held::acquire(lock, pg_sys::LWLockMode::LW_SHARED);
        Some(f(l, Shared { base, _held: PhantomData }))
    }

    /// Runs `f` with the region's parts to change, under its lock in exclusive mode;
    /// `None` when the region does not exist.
    pub fn write<R>(&self, f: impl FnOnce(&L, Exclusive<'_>) -> R) -> Option<R> {
        let (l, base, lock) = self.placed()?;
        let _held = Held::acquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        Some(f(l, Exclusive { base, lent: 0, _held: PhantomData }))
    }

    /// A part whose every access is atomic, for use without the lock.
    pub fn lock_free<T: LockFree>(&self, part: impl FnOnce(&L) -> LockFreePart<T>) -> Option<&'static [T]> {
        let (l, base, _) = self.placed()?;
        let p = part(l).0;
        // SAFETY: the part lies in the region (placed by `Placer` within `size`), aligned;
        // the region lives as long as the process; T is atomics only, so shared references
        // to it may live while any process, holding the lock or not, uses it.
        Some(unsafe { std::slice::from_raw_parts(base.add(p.start) as *const T, p.len) })
    }

    /// Fills in what all-zero bytes do not say, when the region is first created.
    ///
    /// # Safety
    /// `base` is this region's memory, just created: no other process uses it yet.
    pub unsafe fn on_create<R>(&self, base: *mut u8, f: impl FnOnce(&L, Exclusive<'_>) -> R) -> Option<R> {
        let (_, l) = self.placed.get()?;
        Some(f(l, Exclusive { base, lent: 0, _held: PhantomData }))
    }
}

/// The lock, held until dropped: on unwinding too (a Rust panic, or a PostgreSQL ERROR
/// that pgrx turns into one), so it is released before PostgreSQL's abort cleanup.
struct Held(*mut pg_sys::LWLock);

impl Held {
    fn acquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> Held {
        // SAFETY: the region's own lock, set up with it in the startup hook.
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        Held(lock)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: acquired in `acquire`, released once.
        unsafe { pg_sys::LWLockRelease(self.0) }
    }
}

/// The region under its lock in shared mode: shared references only.
pub struct Shared<'a> {
    base: *const u8,
    _held: PhantomData<&'a Held>,
}

impl<'a> Shared<'a> {
    pub fn part<T: Zeroable>(&self, p: Part<T>) -> &'a [T] {
        // SAFETY: the part lies in the region, aligned (`Placer`); while the shared lock is
        // held ('a) no process writes it but through atomics.
        unsafe { std::slice::from_raw_parts(self.base.add(p.start) as *const T, p.len) }
    }

    pub fn one<T: Zeroable>(&self, p: Part<T>) -> &'a T {
        &self.part(p)[0]
    }
}

/// The region under its lock in exclusive mode: each part lent once, mutably, so no two
/// references to one part exist.
pub struct Exclusive<'a> {
    base: *mut u8,
    lent: u64,
    _held: PhantomData<&'a mut Held>,
}

impl<'a> Exclusive<'a> {
    /// Part `p`, mutably. Panics when `p` was lent already (a second `&mut` to it).
    pub fn part<T: Zeroable>(&mut self, p: Part<T>) -> &'a mut [T] {
        let bit = 1u64 << p.id;
        assert!(self.lent & bit == 0, "a shared memory part lent twice under one lock");
        self.lent |= bit;
        // SAFETY: the part lies in the region, aligned, and overlaps no other part
        // (`Placer`); the exclusive lock keeps every other process out while 'a lasts; the
        // check above keeps this process to one reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(p.start) as *mut T, p.len) }
    }

    pub fn one<T: Zeroable>(&mut self, p: Part<T>) -> &'a mut T {
        &mut self.part(p)[0]
    }
}
