//! What the worker derives from the settings and the system: the devices to capture,
//! the ports, the capture settings, and whether the wall clock stepped.

use super::wall_now;
use crate::gucs::Settings;
use pg_netstat_core::capture::{self, CaptureSettings, MAX_DEVICES};
use pgrx::prelude::*;
use std::time::Instant;

/// Notices wall-clock steps (NTP, an operator) by comparing the wall clock with the
/// monotonic one. Only for the log: the bucketing already copes (see stats.rs).
pub struct ClockWatch {
    base: Instant,
    offset_ms: i64,
}

impl ClockWatch {
    fn offset_now(&self) -> i64 {
        let (_, wall_us) = wall_now();
        wall_us / 1000 - self.base.elapsed().as_millis() as i64
    }

    pub fn new() -> ClockWatch {
        let mut w = ClockWatch { base: Instant::now(), offset_ms: 0 };
        w.offset_ms = w.offset_now();
        w
    }

    /// The size of a step since the last call, if the wall clock jumped by over a second.
    pub fn step(&mut self) -> Option<i64> {
        let now = self.offset_now();
        let step = now - self.offset_ms;
        self.offset_ms = now;
        (step.abs() > 1000).then_some(step)
    }
}

pub fn resolve_devices(s: &Settings) -> Vec<String> {
    let mut names = if s.devices.is_empty() {
        match capture::default_device() {
            Ok(Some(d)) => vec![d],
            Ok(None) => {
                if !s.capture_loopback {
                    warning!("pg_netstat: no network device is up besides loopback; set pg_netstat.devices or pg_netstat.capture_loopback");
                }
                vec![]
            }
            Err(e) => {
                warning!("pg_netstat: cannot list network devices: {e}");
                vec![]
            }
        }
    } else {
        s.devices.clone()
    };
    if s.capture_loopback {
        let lo = capture::list_devices()
            .ok()
            .and_then(|l| l.into_iter().find(|d| d.loopback).map(|d| d.name))
            .unwrap_or_else(|| "lo".to_string());
        if !names.contains(&lo) {
            names.push(lo);
        }
    }
    names.truncate(MAX_DEVICES);
    names
}

pub fn capture_settings(s: &Settings) -> CaptureSettings {
    CaptureSettings { buffer_size: s.buffer_size, snaplen: s.snaplen, timeout_ms: s.timeout_ms }
}

/// The server's own port first, then the extra ones (deduplicated).
pub fn all_ports(server_port: u16, s: &Settings) -> Vec<u16> {
    let mut ports = vec![server_port];
    ports.extend(s.ports.iter().copied().filter(|p| *p != server_port));
    ports
}
