//! A settings reload, applied in place: what was counted is published under the old
//! settings first; devices that left are closed and new ones opened, the others keep their
//! rings unless a ring setting, the ports or the method changed (then each is rebuilt,
//! the new ring bound before the old one closes).

use super::*;

impl Worker {
    pub(super) fn reload(&mut self) {
        // SAFETY: the documented way for a background worker to re-read the config.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        let new = Settings::current();
        if new == self.settings {
            return;
        }
        let old = std::mem::replace(&mut self.settings, new.clone());
        if new.save_interval != old.save_interval {
            self.saver.set_interval(new.save_interval);
        }
        self.warn_about_settings();
        let (now, _) = wall_now();

        // Everything counted so far belongs to the old settings.
        for d in self.devices.iter_mut() {
            d.drain(&mut PgEnv, &mut SharedFlows, &self.ports);
        }

        // Interval length and wait: the interval in progress ends under its old length.
        let mut early: Vec<(String, Vec<Closed>)> = Vec::new();
        for d in self.devices.iter_mut() {
            let rows = d.buckets.reconfigure(new.interval, new.packet_wait_time, now);
            if !rows.is_empty() {
                early.push((d.name.clone(), rows));
            }
        }

        // Device list: close only the devices that left (publishing what they held) and
        // open only the ones that joined; the others keep their rings untouched.
        let names = resolve_devices(&new);
        let (kept, mut leaving): (Vec<Device>, Vec<Device>) =
            self.devices.drain(..).partition(|d| names.contains(&d.name));
        for d in leaving.iter_mut() {
            early.push((d.name.clone(), d.buckets.flush()));
        }
        self.publish_rows(early);
        self.devices = kept;
        for n in &names {
            if !self.devices.iter().any(|d| &d.name == n) {
                self.devices.push(new_device(n.clone(), &new, now));
            }
        }
        self.devices.sort_by_key(|d| names.iter().position(|n| n == &d.name));
        STATE.exclusive().retain(&names);
        flowshm::write(|t| t.set_devices(&names));

        // Ring settings, ports or method: rebuild every ring, each bound anew before the
        // old one closes.
        let cs = capture_settings(&new);
        let ports = all_ports(self.server_port, &new);
        if capture_settings(&old) != cs || ports != self.ports || old.method != new.method {
            self.ports = ports;
            for d in self.devices.iter_mut() {
                d.rebuild(&mut PgEnv, &mut SharedFlows, &self.ports, new.method, cs);
            }
        }
        self.set_dirty = true;
        self.open_due();
        // Last: a reader of the log (the tests) may take it that every ring now in place
        // has the new settings.
        log!("pg_netstat: settings reloaded");
    }
}
