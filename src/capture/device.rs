//! Network devices as the capture sees them: looked up by name (index, up/down,
//! loopback, link type, hardware address) with the kernel's interface ioctls.

use super::filter::LinkLayer;
use super::MAX_DEVICE_NAME;
#[cfg(target_os = "linux")]
use std::ffi::CString;
#[cfg(target_os = "linux")]
use std::io;

/// What the capture needs to know about a network device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub ifindex: u32,
    pub up: bool,
    pub loopback: bool,
    pub link: LinkLayer,
    /// Hardware address of an Ethernet device.
    pub mac: Option<[u8; 6]>,
}

/// Checks that `name` can be an interface name at all (the kernel's own rules).
pub fn valid_device_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DEVICE_NAME
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b',')
}

#[cfg(target_os = "linux")]
fn ioctl_ifreq(name: &str, request: libc::c_ulong) -> io::Result<libc::ifreq> {
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain data; zeroed is valid. The name fits (checked below).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if !valid_device_name(name) {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // Any socket will do for interface ioctls; a UDP one needs no privilege.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM.cloexec(), None)?;
    // SAFETY: `ifr` is a valid ifreq for SIOCGIF* requests, which only write into it.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut ifr) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ifr)
}

/// Looks a device up by name. `Ok(None)` when there is no such device.
#[cfg(target_os = "linux")]
pub fn device_info(name: &str) -> io::Result<Option<DeviceInfo>> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_LOOPBACK: u16 = 772;
    let cname = match CString::new(name) {
        Ok(c) if valid_device_name(name) => c,
        _ => return Ok(None),
    };
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Ok(None);
    }
    let flags = match ioctl_ifreq(name, libc::SIOCGIFFLAGS) {
        // SAFETY: SIOCGIFFLAGS fills the flags member of the union.
        Ok(ifr) => (unsafe { ifr.ifr_ifru.ifru_flags }) as i32,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (hatype, hwaddr) = match ioctl_ifreq(name, libc::SIOCGIFHWADDR) {
        // SAFETY: SIOCGIFHWADDR fills the hwaddr member.
        Ok(ifr) => unsafe { (ifr.ifr_ifru.ifru_hwaddr.sa_family, ifr.ifr_ifru.ifru_hwaddr.sa_data) },
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    let link = match hatype {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => LinkLayer::Ethernet,
        _ => LinkLayer::Cooked,
    };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(hwaddr.iter()) {
        *m = *b as u8;
    }
    Ok(Some(DeviceInfo {
        name: name.to_string(),
        ifindex,
        up: flags & libc::IFF_UP != 0,
        loopback: flags & libc::IFF_LOOPBACK != 0,
        link,
        mac: (hatype == ARPHRD_ETHER).then_some(mac),
    }))
}

/// All devices, in ifindex order.
#[cfg(target_os = "linux")]
pub fn list_devices() -> io::Result<Vec<DeviceInfo>> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            if let Ok(name) = std::ffi::CStr::from_ptr((*p).if_name).to_str() {
                if let Ok(Some(info)) = device_info(name) {
                    out.push(info);
                }
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out.sort_by_key(|d| d.ifindex);
    Ok(out)
}

/// The device captured when none is configured: the first that is up and not loopback.
#[cfg(target_os = "linux")]
pub fn default_device() -> io::Result<Option<String>> {
    Ok(list_devices()?.into_iter().find(|d| d.up && !d.loopback).map(|d| d.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert!(valid_device_name("eth0"));
        assert!(valid_device_name("veth-pg_1"));
        assert!(!valid_device_name(""));
        assert!(!valid_device_name("a_name_too_long_"));
        assert!(!valid_device_name("eth0 "));
        assert!(!valid_device_name("a/b"));
        assert!(!valid_device_name(".."));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_is_found_and_marked() {
        let lo = device_info("lo").unwrap().expect("lo exists");
        assert!(lo.loopback && lo.up);
        assert_eq!(lo.link, LinkLayer::Ethernet);
        assert_eq!(device_info("pgns-nope0").unwrap(), None);
        assert!(list_devices().unwrap().iter().any(|d| d.name == "lo"));
    }
}
