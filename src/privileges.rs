//! Least privilege for CAP_NET_RAW, free of PostgreSQL.
//!
//! The server may be started with CAP_NET_RAW (ambient capability or a file capability
//! on the binary), but only the capture worker needs it. The postmaster keeps it in its
//! permitted set alone — not effective, not inheritable, not ambient — so every process
//! it forks starts unable to use it, and every program any of them executes (COPY TO
//! PROGRAM, archive_command) gets nothing. Client backends then drop it for good as they
//! authenticate; the capture worker raises it into its effective set.

use std::io;

const CAP_NET_RAW: u32 = 13;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const NET_RAW_BIT: u32 = 1 << CAP_NET_RAW; // caps 0..31 live in the first data word

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
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

fn clear_ambient() -> io::Result<()> {
    // SAFETY: prctl with constant arguments.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
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

/// For the postmaster: keep CAP_NET_RAW permitted only (if held), drop every other
/// capability, and empty the effective, inheritable and ambient sets.
pub fn postmaster_keep_permitted_only() -> io::Result<()> {
    clear_ambient()?;
    let mut d = get()?;
    d[0].permitted &= NET_RAW_BIT;
    d[1].permitted = 0;
    for w in d.iter_mut() {
        w.effective = 0;
        w.inheritable = 0;
    }
    set(d)
}

/// For every process that is not the capture worker: no capabilities at all, for good.
pub fn drop_all() -> io::Result<()> {
    clear_ambient()?;
    set([CapData::default(); 2])
}

/// For the capture worker: make CAP_NET_RAW effective. `Ok(false)` when the process
/// does not hold it (the server was started without it).
pub fn raise_net_raw() -> io::Result<bool> {
    let mut d = get()?;
    if d[0].permitted & NET_RAW_BIT == 0 {
        return Ok(false);
    }
    d[0].effective |= NET_RAW_BIT;
    set(d)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_capabilities_works_for_anyone() {
        let now = net_raw().unwrap();
        assert!(!now.effective || now.permitted, "effective without permitted: {now:?}");
    }

    /// Dropping is irreversible, so it runs in a child process.
    #[test]
    fn the_three_steps_in_a_child_process() {
        // SAFETY: fork in a test; the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| -> io::Result<i32> {
                let before = net_raw()?;
                postmaster_keep_permitted_only()?;
                let pm = net_raw()?;
                if pm.effective || pm.inheritable || pm.permitted != before.permitted {
                    return Ok(2);
                }
                if raise_net_raw()? != before.permitted || net_raw()?.effective != before.permitted {
                    return Ok(3);
                }
                drop_all()?;
                let gone = net_raw()?;
                if gone.effective || gone.permitted || raise_net_raw()? {
                    return Ok(4);
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
        assert_eq!(libc::WEXITSTATUS(status), 0, "step failed (2 postmaster, 3 raise, 4 drop, 5 syscall)");
    }
}
