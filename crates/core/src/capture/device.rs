//! Network devices as the capture sees them: looked up by name (index, up/down,
//! loopback, link type, hardware address). The Linux-native build asks the kernel's
//! interface ioctls (SIOCGIF*); every other build (and the `portable` one) reads the
//! POSIX getifaddrs(3) list, whose link-level entries carry the hardware address.

use super::filter::LinkLayer;
use super::MAX_DEVICE_NAME;
#[cfg(linux_native)]
use std::ffi::CString;
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

#[cfg(linux_native)]
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
#[cfg(linux_native)]
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
#[cfg(linux_native)]
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
pub fn default_device() -> io::Result<Option<String>> {
    Ok(list_devices()?.into_iter().find(|d| d.up && !d.loopback).map(|d| d.name))
}

/// Looks a device up by name in getifaddrs(3). `Ok(None)` when there is no such device.
#[cfg(not(linux_native))]
pub fn device_info(name: &str) -> io::Result<Option<DeviceInfo>> {
    if !valid_device_name(name) {
        return Ok(None);
    }
    Ok(list_devices()?.into_iter().find(|d| d.name == name))
}

/// All devices getifaddrs(3) knows (a device with no address has its link-level entry),
/// in ifindex order.
#[cfg(not(linux_native))]
pub fn list_devices() -> io::Result<Vec<DeviceInfo>> {
    let mut out: Vec<DeviceInfo> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes the head of a list it allocates, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: getifaddrs gives NUL-terminated names.
        let Ok(name) = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_str() else { continue };
        if !valid_device_name(name) {
            continue;
        }
        let mac = link_address(ifa.ifa_addr);
        let flags = ifa.ifa_flags as libc::c_int;
        match out.iter_mut().find(|d| d.name == name) {
            Some(d) => d.mac = d.mac.or(mac),
            None => out.push(DeviceInfo {
                name: name.to_string(),
                ifindex: 0,
                up: flags & libc::IFF_UP != 0,
                loopback: flags & libc::IFF_LOOPBACK != 0,
                link: LinkLayer::Cooked,
                mac,
            }),
        }
    }
    // SAFETY: the list getifaddrs allocated; nothing points into it any more.
    unsafe { libc::freeifaddrs(head) };
    for d in &mut out {
        let cname = std::ffi::CString::new(d.name.as_str()).unwrap_or_default();
        // SAFETY: a valid NUL-terminated string.
        d.ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        // For libpcap the device's own link type decides; this is what the name says
        // about the frames (the ring's filter, absent here, is what reads it).
        d.link = if d.mac.is_some() || d.loopback { LinkLayer::Ethernet } else { LinkLayer::Cooked };
        if d.loopback {
            d.mac = None;
        }
    }
    // Gone between the two calls: as if it had never been listed.
    out.retain(|d| d.ifindex != 0);
    out.sort_by_key(|d| d.ifindex);
    Ok(out)
}

/// The Ethernet address in a link-level entry of getifaddrs(3): a `sockaddr_ll` on Linux
/// (`AF_PACKET`), a `sockaddr_dl` elsewhere (`AF_LINK`). The only system-dependent line
/// of the portable device code; both decoders are plain byte readers, tested on any system.
#[cfg(not(linux_native))]
fn link_address(sa: *const libc::sockaddr) -> Option<[u8; 6]> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a sockaddr from getifaddrs; every layout starts with its family.
    let family = unsafe { (*sa).sa_family } as libc::c_int;
    #[cfg(target_os = "linux")]
    let (is_link, len) = (family == libc::AF_PACKET, SOCKADDR_LL_LEN);
    #[cfg(not(target_os = "linux"))]
    // SAFETY: as above; sdl_len, the first byte, is the length of a sockaddr_dl.
    let (is_link, len) = (family == libc::AF_LINK, unsafe { *(sa as *const u8) } as usize);
    if !is_link {
        return None;
    }
    // SAFETY: a link-level entry is a sockaddr_ll (20 bytes) or a sockaddr_dl of sdl_len
    // bytes, as chosen above.
    let bytes = unsafe { std::slice::from_raw_parts(sa as *const u8, len) };
    if cfg!(target_os = "linux") {
        mac_from_sockaddr_ll(bytes)
    } else {
        mac_from_sockaddr_dl(bytes)
    }
}

/// Size of Linux's `struct sockaddr_ll`.
pub const SOCKADDR_LL_LEN: usize = 20;

/// The hardware address of an Ethernet device from the bytes of a Linux `sockaddr_ll`:
/// family (2), protocol (2), ifindex (4), hatype (2, host order), pkttype (1), halen (1),
/// address (8).
pub fn mac_from_sockaddr_ll(b: &[u8]) -> Option<[u8; 6]> {
    const ARPHRD_ETHER: u16 = 1;
    if b.len() < SOCKADDR_LL_LEN || u16::from_ne_bytes([b[8], b[9]]) != ARPHRD_ETHER || b[11] != 6 {
        return None;
    }
    b[12..18].try_into().ok()
}

/// The hardware address of an Ethernet device from the bytes of a BSD/macOS
/// `sockaddr_dl`: len (1), family (1), index (2), type (1), nlen (1), alen (1), slen (1),
/// then the name (nlen bytes) and the address (alen bytes).
pub fn mac_from_sockaddr_dl(b: &[u8]) -> Option<[u8; 6]> {
    const IFT_ETHER: u8 = 0x06;
    if b.len() < 8 || b[4] != IFT_ETHER || b[6] != 6 {
        return None;
    }
    let at = 8 + b[5] as usize;
    b.get(at..at + 6)?.try_into().ok()
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

    /// The portable device list (getifaddrs) against what Linux says in sysfs: index,
    /// up, loopback and the Ethernet address of every device (skipping one that another
    /// test removes meanwhile).
    #[cfg(all(not(linux_native), target_os = "linux"))]
    #[test]
    fn getifaddrs_agrees_with_sysfs() {
        let read = |dev: &str, what: &str| std::fs::read_to_string(format!("/sys/class/net/{dev}/{what}")).ok();
        let mut with_mac = 0;
        for d in list_devices().unwrap() {
            let (Some(ty), Some(addr), Some(index), Some(flags)) =
                (read(&d.name, "type"), read(&d.name, "address"), read(&d.name, "ifindex"), read(&d.name, "flags"))
            else {
                continue;
            };
            let flags = i32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
            let mac = (ty.trim() == "1").then(|| {
                let b: Vec<u8> = addr.trim().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
                <[u8; 6]>::try_from(b).unwrap()
            });
            with_mac += usize::from(mac.is_some());
            assert_eq!(d.ifindex.to_string(), index.trim(), "{d:?}");
            assert_eq!((d.up, d.loopback), (flags & 1 != 0, flags & 8 != 0), "{d:?}");
            assert_eq!(d.mac, mac, "{d:?}");
        }
        assert!(with_mac > 0, "no Ethernet device to compare with");
        assert_eq!(device_info("lo").unwrap().map(|d| (d.loopback, d.mac)), Some((true, None)));
    }

    /// What getifaddrs gave for a veth on Linux and for em0 on FreeBSD (bytes as laid
    /// out in memory, little-endian host).
    #[test]
    fn link_level_addresses_of_both_layouts() {
        let mac = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
        let mut ll = [0u8; SOCKADDR_LL_LEN];
        ll[0..2].copy_from_slice(&17u16.to_ne_bytes()); // AF_PACKET
        ll[4..8].copy_from_slice(&7i32.to_ne_bytes());
        ll[8..10].copy_from_slice(&1u16.to_ne_bytes()); // ARPHRD_ETHER
        ll[11] = 6;
        ll[12..18].copy_from_slice(&mac);
        assert_eq!(mac_from_sockaddr_ll(&ll), Some(mac));
        let mut lo = ll;
        lo[8..10].copy_from_slice(&772u16.to_ne_bytes()); // ARPHRD_LOOPBACK
        assert_eq!(mac_from_sockaddr_ll(&lo), None);
        assert_eq!(mac_from_sockaddr_ll(&ll[..19]), None);

        let mut dl = vec![0u8, 18, 1, 0, 0x06, 3, 6, 0];
        dl.extend_from_slice(b"em0");
        dl.extend_from_slice(&mac);
        dl[0] = dl.len() as u8;
        assert_eq!(mac_from_sockaddr_dl(&dl), Some(mac));
        let mut lo0 = dl.clone();
        lo0[4] = 0x18; // IFT_LOOP
        assert_eq!(mac_from_sockaddr_dl(&lo0), None);
        assert_eq!(mac_from_sockaddr_dl(&dl[..dl.len() - 1]), None);
    }
}
