//! Least privilege for CAP_NET_RAW, free of PostgreSQL.
//!
//! The server may be started with CAP_NET_RAW (ambient capability or a file capability
//! on the binary), but only the capture worker needs it. The postmaster keeps it in its
//! permitted set alone — not effective, not inheritable, not ambient — so every process
//! it forks starts unable to use it, and every program any of them executes (COPY TO
//! PROGRAM, archive_command) gets nothing. Client backends then drop it for good as they
//! authenticate; the capture worker raises it into its effective set.
//!
//! Only the CAP_NET_RAW bit is ever changed. Whatever else the administrator granted
//! (CAP_NET_BIND_SERVICE for a port below 1024, say) stays in every set exactly as it
//! was: effective, permitted, inheritable, ambient and bounding.

use std::io;

const CAP_NET_RAW: u32 = 13;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const NET_RAW_BIT: u32 = 1 << CAP_NET_RAW; // caps 0..31 live in the first data word

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// One word of the capget/capset sets (caps 0..31 in the first, 32..63 in the second).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

/// For the postmaster: CAP_NET_RAW stays permitted, if held, so that the worker can
/// raise it; it leaves the effective and inheritable sets. Every other bit is kept.
pub fn net_raw_permitted_only(mut d: [CapData; 2]) -> [CapData; 2] {
    d[0].effective &= !NET_RAW_BIT;
    d[0].inheritable &= !NET_RAW_BIT;
    d
}

/// For a process that must never use CAP_NET_RAW: the bit leaves every set, and with it
/// any way back. Every other bit is kept.
pub fn without_net_raw(d: [CapData; 2]) -> [CapData; 2] {
    let mut d = net_raw_permitted_only(d);
    d[0].permitted &= !NET_RAW_BIT;
    d
}

/// For the capture worker: CAP_NET_RAW made effective, or `None` when it is not
/// permitted (the server was started without it). Every other bit is kept.
pub fn net_raw_effective(mut d: [CapData; 2]) -> Option<[CapData; 2]> {
    if d[0].permitted & NET_RAW_BIT == 0 {
        return None;
    }
    d[0].effective |= NET_RAW_BIT;
    Some(d)
}

fn get() -> io::Result<[CapData; 2]> {
    let mut hdr = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header writes two CapData entries, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut CapHeader, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

fn set(data: [CapData; 2]) -> io::Result<()> {
    let mut hdr = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    // SAFETY: capset reads a v3 header and two CapData entries; only lowering sets or
    // raising effective within permitted is ever asked for, which cannot harm.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes CAP_NET_RAW, and only it, out of the ambient set; other ambient capabilities
/// keep passing to the programs the server runs, as the administrator meant.
fn lower_ambient_net_raw() -> io::Result<()> {
    // SAFETY: prctl with constant arguments.
    let rc =
        unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_LOWER, CAP_NET_RAW as libc::c_ulong, 0, 0) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // A kernel without ambient capabilities (before 4.3) has none to lower.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Ok(())
}

/// What the current process holds of CAP_NET_RAW.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRaw {
    pub effective: bool,
    pub permitted: bool,
    pub inheritable: bool,
}

pub fn net_raw() -> io::Result<NetRaw> {
    let d = get()?;
    Ok(NetRaw {
        effective: d[0].effective & NET_RAW_BIT != 0,
        permitted: d[0].permitted & NET_RAW_BIT != 0,
        inheritable: d[0].inheritable & NET_RAW_BIT != 0,
    })
}

/// For the postmaster, before it forks anything: CAP_NET_RAW permitted only.
pub fn postmaster_keep_net_raw_permitted_only() -> io::Result<()> {
    lower_ambient_net_raw()?;
    set(net_raw_permitted_only(get()?))
}

/// For every process that is not the capture worker: no CAP_NET_RAW, for good.
pub fn drop_net_raw() -> io::Result<()> {
    lower_ambient_net_raw()?;
    set(without_net_raw(get()?))
}

/// For the capture worker: make CAP_NET_RAW effective. `Ok(false)` when the process
/// does not hold it (the server was started without it).
pub fn raise_net_raw() -> io::Result<bool> {
    match net_raw_effective(get()?) {
        Some(d) => set(d).map(|()| true),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_BIND_SERVICE_BIT: u32 = 1 << 10;
    const SYS_NICE_BIT: u32 = 1 << 23;
    const ALL: u32 = u32::MAX;

    fn sets(effective: u32, permitted: u32, inheritable: u32) -> [CapData; 2] {
        // The second word (caps 32..63) holds something too, to see that it is kept.
        [
            CapData { effective, permitted, inheritable },
            CapData { effective: 0b101, permitted: 0b111, inheritable: 0b1 },
        ]
    }

    #[test]
    fn the_postmaster_keeps_net_raw_permitted_and_everything_else_as_it_was() {
        let granted = NET_RAW_BIT | NET_BIND_SERVICE_BIT | SYS_NICE_BIT;
        let after = net_raw_permitted_only(sets(granted, granted, granted));
        let others = NET_BIND_SERVICE_BIT | SYS_NICE_BIT;
        assert_eq!(after, sets(others, granted, others));
        // Nothing but CAP_NET_RAW: only the permitted bit is left.
        assert_eq!(net_raw_permitted_only(sets(NET_RAW_BIT, NET_RAW_BIT, NET_RAW_BIT)), sets(0, NET_RAW_BIT, 0));
        // Without CAP_NET_RAW nothing changes at all.
        assert_eq!(net_raw_permitted_only(sets(others, ALL & !NET_RAW_BIT, 0)), sets(others, ALL & !NET_RAW_BIT, 0));
    }

    #[test]
    fn a_client_backend_loses_net_raw_everywhere_and_nothing_else() {
        let everything = sets(ALL, ALL, ALL);
        assert_eq!(without_net_raw(everything), sets(!NET_RAW_BIT, !NET_RAW_BIT, !NET_RAW_BIT));
        let after_postmaster =
            net_raw_permitted_only(sets(NET_RAW_BIT | NET_BIND_SERVICE_BIT, NET_RAW_BIT | NET_BIND_SERVICE_BIT, 0));
        assert_eq!(without_net_raw(after_postmaster), sets(NET_BIND_SERVICE_BIT, NET_BIND_SERVICE_BIT, 0));
        assert_eq!(without_net_raw(sets(0, 0, 0)), sets(0, 0, 0));
    }

    #[test]
    fn the_worker_raises_net_raw_only_when_permitted() {
        let after_postmaster = sets(NET_BIND_SERVICE_BIT, NET_RAW_BIT | NET_BIND_SERVICE_BIT, NET_BIND_SERVICE_BIT);
        assert_eq!(
            net_raw_effective(after_postmaster),
            Some(sets(NET_RAW_BIT | NET_BIND_SERVICE_BIT, NET_RAW_BIT | NET_BIND_SERVICE_BIT, NET_BIND_SERVICE_BIT))
        );
        assert_eq!(net_raw_effective(sets(NET_BIND_SERVICE_BIT, NET_BIND_SERVICE_BIT, 0)), None);
    }

    #[test]
    fn reading_capabilities_works_for_anyone() {
        let now = net_raw().unwrap();
        assert!(!now.effective || now.permitted, "effective without permitted: {now:?}");
    }

    fn ambient_is_set(cap: u32) -> io::Result<bool> {
        // SAFETY: prctl with constant arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap as libc::c_ulong, 0, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc == 1)
    }

    fn raise_ambient(cap: u32) -> io::Result<()> {
        // SAFETY: prctl with constant arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap as libc::c_ulong, 0, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The real syscalls, in a child process because dropping is irreversible. Where
    /// the test runs with CAP_NET_RAW and CAP_NET_BIND_SERVICE permitted (as root), it
    /// first makes both ambient, like `setpriv --ambient-caps=+net_raw,+net_bind_service`.
    #[test]
    fn the_three_steps_in_a_child_process() {
        // SAFETY: fork in a test; the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| -> io::Result<i32> {
                let both = NET_RAW_BIT | NET_BIND_SERVICE_BIT;
                let mut start = get()?;
                let with_ambient = start[0].permitted & both == both;
                if with_ambient {
                    start[0].inheritable |= both;
                    set(start)?;
                    raise_ambient(CAP_NET_RAW)?;
                    raise_ambient(10)?;
                }
                let before = get()?;
                postmaster_keep_net_raw_permitted_only()?;
                if get()? != net_raw_permitted_only(before) {
                    return Ok(2);
                }
                if with_ambient && (ambient_is_set(CAP_NET_RAW)? || !ambient_is_set(10)?) {
                    return Ok(6);
                }
                let pm = get()?;
                let permitted = pm[0].permitted & NET_RAW_BIT != 0;
                if raise_net_raw()? != permitted || get()? != net_raw_effective(pm).unwrap_or(pm) {
                    return Ok(3);
                }
                let worker = get()?;
                drop_net_raw()?;
                if get()? != without_net_raw(worker) || raise_net_raw()? {
                    return Ok(4);
                }
                if with_ambient && !ambient_is_set(10)? {
                    return Ok(6);
                }
                Ok(0)
            })()
            .unwrap_or(5);
            // SAFETY: leave the forked test process without running the harness again.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child died: {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "step failed (2 postmaster, 3 raise, 4 drop, 5 syscall, 6 another ambient capability was lost)"
        );
    }
}
