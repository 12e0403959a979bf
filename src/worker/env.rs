//! The worker's side of a device's surroundings (`device::Env`): real device lookups
//! and capture sources, the system clocks, the server log, and the flow table's lock.

use pg_netstat_core::capture::source::Source;
use pg_netstat_core::capture::{self, CaptureError, CaptureMethod, CaptureSettings, DeviceInfo};

use crate::flowshm;
use pg_netstat_core::device::{Clocks, DeviceState, Env, Event, FlowLock};
use pg_netstat_core::flows::FlowTable;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Set once the missing-privilege warning has been logged, so a worker with several
/// devices says it once, not once per device; cleared when capture works again.
static PERMISSION_REPORTED: AtomicBool = AtomicBool::new(false);

fn log_report(level: PgLogLevel, code: PgSqlErrorCode, message: String, hint: Option<&str>) {
    let mut r = ErrorReport::new(code, message, "pg_netstat worker");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(level);
}

#[cfg(linux_native)]
const PERMISSION_HINT: &str = "Packet capture needs CAP_NET_RAW (nothing else). Start the server with it, e.g. \
    setpriv --inh-caps=+net_raw --ambient-caps=+net_raw pg_ctl start ..., or grant it to the binary once with \
    setcap cap_net_raw=ep on the postgres executable. Capture is retried every minute.";
#[cfg(not(linux_native))]
const PERMISSION_HINT: &str = "This build captures through libpcap and does not manage privileges. On Linux \
    start the server with CAP_NET_RAW, e.g. setpriv --inh-caps=+net_raw --ambient-caps=+net_raw pg_ctl start ..., \
    or grant it to the binary once with setcap cap_net_raw=ep on the postgres executable; on BSD and macOS give \
    the server's user read access to /dev/bpf*. Capture is retried every minute.";

/// The server side of a device's surroundings: real lookups and sources, the system
/// clocks, and the server log.
pub struct PgEnv;

impl Clocks for PgEnv {
    fn wall_ns(&self) -> u64 {
        // Before 1970 only on a badly broken clock; count it as 0 rather than fail.
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
    }
    fn mono(&self) -> Instant {
        Instant::now()
    }
}

impl Env for PgEnv {
    type Source = Source;

    fn lookup(&mut self, name: &str) -> std::io::Result<Option<DeviceInfo>> {
        capture::device_info(name)
    }

    fn open(
        &mut self,
        method: CaptureMethod,
        info: &DeviceInfo,
        ports: &[u16],
        settings: CaptureSettings,
    ) -> Result<Source, CaptureError> {
        Source::open(method, info, ports, settings)
    }

    fn report(&mut self, device: &str, event: Event) {
        match event {
            Event::State { state, error } => report_state(device, state, &error),
            Event::Opened { describe } => log!("pg_netstat: device \"{device}\": {describe}"),
            Event::Rebuilt { describe } => log!("pg_netstat: device \"{device}\": new settings, {describe}"),
            Event::RebuildFailed { error } => log_report(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                format!("pg_netstat: cannot apply the new capture settings on device \"{device}\": {error}"),
                Some("Capture goes on with the previous settings."),
            ),
            Event::LookupFailed { error } => log!("pg_netstat: cannot look at device \"{device}\": {error}"),
            Event::Handover { held_old, held_new, in_window, twins } => debug1!(
                "pg_netstat: device \"{device}\": ring handover: held {held_old} old and {held_new} new frames, \
                 {in_window} of them in the window, {twins} twins"
            ),
        }
    }

    fn clock(&self) -> &dyn Clocks {
        self
    }
}

/// The flow table in shared memory, when `pg_netstat.max_flows` > 0.
pub struct SharedFlows;

impl FlowLock for SharedFlows {
    fn enabled(&self) -> bool {
        flowshm::enabled()
    }
    fn with<R>(&mut self, f: impl FnOnce(&mut FlowTable<'_>) -> R) -> Option<R> {
        flowshm::write(f)
    }
}

/// Logs a device's new state, once per change.
fn report_state(device: &str, state: DeviceState, error: &str) {
    match state {
        DeviceState::Capturing => {
            PERMISSION_REPORTED.store(false, Ordering::Relaxed);
            log!("pg_netstat: capturing on device \"{device}\"");
        }
        DeviceState::NoPermission => {
            if !PERMISSION_REPORTED.swap(true, Ordering::Relaxed) {
                log_report(
                    PgLogLevel::WARNING,
                    PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    format!("pg_netstat: cannot capture network traffic: {error}"),
                    Some(PERMISSION_HINT),
                )
            }
        }
        DeviceState::Missing => log_report(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("pg_netstat: network device \"{device}\" does not exist"),
            Some("Check pg_netstat.devices (ip link lists the devices). Capture starts when the device appears."),
        ),
        DeviceState::Down => {
            log!("pg_netstat: network device \"{device}\" is down; capture resumes when it is up")
        }
        DeviceState::Error => log_report(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            format!("pg_netstat: capture on device \"{device}\" failed: {error}"),
            Some("Capture is retried with a growing delay."),
        ),
        DeviceState::Starting | DeviceState::Stopped => {}
    }
}
