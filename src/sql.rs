//! SQL entry points. They only read shared memory; the view and grants are in sql/.

use crate::capture::CaptureMethod;
use crate::shmem::{Slot, INJECT_ERROR, STATE};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

/// Unix microseconds to PostgreSQL's timestamptz (microseconds since 2000-01-01 UTC).
fn timestamptz(unix_us: i64) -> TimestampWithTimeZone {
    const PG_EPOCH_OFFSET_US: i64 = 946_684_800 * 1_000_000;
    TimestampWithTimeZone::try_from(unix_us - PG_EPOCH_OFFSET_US).unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity())
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Every closed interval of every captured device; the `pg_netstat` view orders it.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_history() -> TableIterator<'static, (
    name!(device, String),
    name!(ts, TimestampWithTimeZone),
    name!(packets_in, i64),
    name!(packets_out, i64),
    name!(packets_in_speed, i64),
    name!(packets_out_speed, i64),
    name!(bytes_in, i64),
    name!(bytes_out, i64),
    name!(bytes_in_speed, i64),
    name!(bytes_out_speed, i64),
    name!(created_at, TimestampWithTimeZone),
)> {
    let row = |device: &str, s: &Slot| {
        let secs = s.secs.max(1) as u64;
        let c = s.counters;
        (
            device.to_string(),
            timestamptz(s.start * 1_000_000),
            as_i64(c.packets_in),
            as_i64(c.packets_out),
            as_i64(c.packets_in / secs),
            as_i64(c.packets_out / secs),
            as_i64(c.bytes_in),
            as_i64(c.bytes_out),
            as_i64(c.bytes_in / secs),
            as_i64(c.bytes_out / secs),
            timestamptz(s.created_at_us),
        )
    };
    let rows: Vec<_> = {
        let shared = STATE.share();
        shared.devices.iter().filter(|d| d.in_use).flat_map(|d| d.history().map(move |s| row(d.name(), s))).collect()
    };
    TableIterator::new(rows)
}

/// Capture status per device: whether it is counting, and if not, why.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_device_status() -> TableIterator<'static, (
    name!(device, String),
    name!(capture_method, String),
    name!(state, String),
    name!(state_since, TimestampWithTimeZone),
    name!(packets_in, i64),
    name!(packets_out, i64),
    name!(bytes_in, i64),
    name!(bytes_out, i64),
    name!(kernel_drops, i64),
    name!(ring_freezes, i64),
    name!(last_error, Option<String>),
)> {
    let rows: Vec<_> = {
        let shared = STATE.share();
        shared
            .devices
            .iter()
            .filter(|d| d.in_use)
            .map(|d| {
                let err = d.last_error();
                (
                    d.name().to_string(),
                    CaptureMethod::from_i32(d.method as i32).as_str().to_string(),
                    d.state.as_str().to_string(),
                    timestamptz(d.state_since_us),
                    as_i64(d.total.packets_in),
                    as_i64(d.total.packets_out),
                    as_i64(d.total.bytes_in),
                    as_i64(d.total.bytes_out),
                    as_i64(d.kernel_drops),
                    as_i64(d.ring_freezes),
                    (!err.is_empty()).then(|| err.to_string()),
                )
            })
            .collect()
    };
    TableIterator::new(rows)
}

/// Every closed interval with what the compatible view leaves out: its own length (it
/// changes when pg_netstat.interval is reloaded), packets the kernel dropped, and
/// packets counted late.
#[pg_extern(volatile, parallel_restricted)]
fn pg_netstat_interval_history() -> TableIterator<
    'static,
    (
        name!(device, String),
        name!(ts, TimestampWithTimeZone),
        name!(interval_seconds, i32),
        name!(packets_in, i64),
        name!(packets_out, i64),
        name!(bytes_in, i64),
        name!(bytes_out, i64),
        name!(kernel_drops, i64),
        name!(late_packets, i64),
        name!(created_at, TimestampWithTimeZone),
    ),
> {
    let row = |device: &str, s: &Slot| {
        (
            device.to_string(),
            timestamptz(s.start * 1_000_000),
            i32::try_from(s.secs).unwrap_or(i32::MAX),
            as_i64(s.counters.packets_in),
            as_i64(s.counters.packets_out),
            as_i64(s.counters.bytes_in),
            as_i64(s.counters.bytes_out),
            as_i64(s.kernel_drops),
            as_i64(s.late),
            timestamptz(s.created_at_us),
        )
    };
    let rows: Vec<_> = {
        let shared = STATE.share();
        shared.devices.iter().filter(|d| d.in_use).flat_map(|d| d.history().map(move |s| row(d.name(), s))).collect()
    };
    TableIterator::new(rows)
}

/// Makes the capture worker raise an ERROR at its next wake-up, so an operator (or a
/// test) can see it restarted and capture resumed. Superuser only. Returns the PID of
/// the worker that was asked, or NULL when no worker is running.
#[pg_extern(volatile, parallel_unsafe)]
fn pg_netstat_inject_worker_error() -> Option<i32> {
    let pid = STATE.share().worker_pid;
    if pid <= 0 {
        return None;
    }
    INJECT_ERROR.get().store(true, Ordering::Release);
    // SIGHUP wakes the worker's latch; the reload it also causes changes nothing.
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    (rc == 0).then_some(pid)
}
