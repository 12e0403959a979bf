//! Per device: the interval history (pg_netstat, pg_netstat_intervals) and capture state
//! (pg_netstat_devices).

use super::*;

rows_fn! {
    /// Every closed interval of every captured device; the `pg_netstat` view orders it.
    fn pg_netstat_history() -> rows(
        device: String,
        ts: TimestampWithTimeZone,
        packets_in: i64,
        packets_out: i64,
        packets_in_speed: i64,
        packets_out_speed: i64,
        bytes_in: i64,
        bytes_out: i64,
        bytes_in_speed: i64,
        bytes_out_speed: i64,
        created_at: TimestampWithTimeZone,
    ) {
        let row = |device: &str, s: &Slot| {
            let secs = s.secs.max(1) as u64;
            let c = s.counters;
            (
                device.to_string(),
                timestamptz(s.start.saturating_mul(1_000_000)),
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
        // Copied under the lock, converted after it: a long history must not keep the
        // collector waiting while PostgreSQL builds the rows.
        let copied: Vec<(String, Slot)> = shmem::share().histories().map(|(d, s)| (d.name().to_string(), *s)).collect();
        let rows: Vec<_> = copied.iter().map(|(d, s)| row(d, s)).collect();
        TableIterator::new(rows)
    }
}

rows_fn! {
    /// Capture status per device: whether it is counting, and if not, why.
    fn pg_netstat_device_status() -> rows(
        device: String,
        capture_method: String,
        state: String,
        state_since: TimestampWithTimeZone,
        packets_in: i64,
        packets_out: i64,
        bytes_in: i64,
        bytes_out: i64,
        kernel_drops: i64,
        ring_freezes: i64,
        last_error: Option<String>,
    ) {
        // A worker that ended with an error had no chance to say so: with no worker
        // running, nothing is capturing whatever its devices last showed.
        let worker_running = WORKER_PID.get().load(Ordering::Acquire) > 0;
        let exited_us = WORKER_EXITED_US.get().load(Ordering::Acquire);
        let rows: Vec<_> = {
            let shared = STATE.share();
            shared
                .devices
                .iter()
                .filter(|d| d.in_use)
                .map(|d| {
                    let err = d.last_error();
                    let (state, since_us) = if worker_running {
                        (d.state, d.state_since_us)
                    } else {
                        (DeviceState::Stopped, if exited_us > 0 { exited_us } else { d.state_since_us })
                    };
                    (
                        d.name().to_string(),
                        CaptureMethod::from_i32(d.method as i32).as_str().to_string(),
                        state.as_str().to_string(),
                        timestamptz(since_us),
                        as_i64(d.total.packets_in.saturating_sub(d.total_base.packets_in)),
                        as_i64(d.total.packets_out.saturating_sub(d.total_base.packets_out)),
                        as_i64(d.total.bytes_in.saturating_sub(d.total_base.bytes_in)),
                        as_i64(d.total.bytes_out.saturating_sub(d.total_base.bytes_out)),
                        as_i64(d.kernel_drops),
                        as_i64(d.ring_freezes),
                        (!err.is_empty()).then(|| err.to_string()),
                    )
                })
                .collect()
        };
        TableIterator::new(rows)
    }
}

rows_fn! {
    /// Every closed interval with what the compatible view leaves out: its own length (it
    /// changes when pg_netstat.interval is reloaded), packets the kernel dropped, and
    /// packets counted late.
    fn pg_netstat_interval_history() -> rows(
        device: String,
        ts: TimestampWithTimeZone,
        interval_seconds: i32,
        packets_in: i64,
        packets_out: i64,
        bytes_in: i64,
        bytes_out: i64,
        kernel_drops: i64,
        late_packets: i64,
        created_at: TimestampWithTimeZone,
        connection_attempts: i64,
        resets_in: i64,
        resets_out: i64,
        retransmits_in: i64,
        retransmits_out: i64,
        zero_windows_in: i64,
        zero_windows_out: i64,
        out_of_order_in: i64,
        out_of_order_out: i64,
    ) {
        let row = |device: &str, s: &Slot| {
            let t = s.tcp;
            (
                device.to_string(),
                timestamptz(s.start.saturating_mul(1_000_000)),
                i32::try_from(s.secs).unwrap_or(i32::MAX),
                as_i64(s.counters.packets_in),
                as_i64(s.counters.packets_out),
                as_i64(s.counters.bytes_in),
                as_i64(s.counters.bytes_out),
                as_i64(s.kernel_drops),
                as_i64(s.late),
                timestamptz(s.created_at_us),
                as_i64(t.syn),
                as_i64(t.rst_in),
                as_i64(t.rst_out),
                as_i64(t.retrans_in),
                as_i64(t.retrans_out),
                as_i64(t.zero_window_in),
                as_i64(t.zero_window_out),
                as_i64(t.ooo_in),
                as_i64(t.ooo_out),
            )
        };
        // Copied under the lock, converted after it: a long history must not keep the
        // collector waiting while PostgreSQL builds the rows.
        let copied: Vec<(String, Slot)> = shmem::share().histories().map(|(d, s)| (d.name().to_string(), *s)).collect();
        let rows: Vec<_> = copied.iter().map(|(d, s)| row(d, s)).collect();
        TableIterator::new(rows)
    }
}
