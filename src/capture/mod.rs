//! Packet capture, free of PostgreSQL: devices, the in-kernel filter, the TPACKET_V3
//! ring, header parsing and the direction rule. The worker and the benchmark both drive
//! it; plain `cargo test` covers it.

pub mod field;
pub mod filter;
pub mod packet;
#[cfg(any(feature = "pcap", not(target_os = "linux")))]
pub mod pcap;
#[cfg(target_os = "linux")]
pub mod ring;
pub mod source;
#[cfg(test)]
pub(crate) mod testframes;

use filter::{FilterError, LinkLayer, PACKET_OUTGOING};
use std::ffi::CString;
use std::fmt;
use std::io;

/// How packets are read from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum CaptureMethod {
    /// The ring where it opens, else libpcap when built in.
    Auto = 0,
    /// AF_PACKET TPACKET_V3 ring with our own BPF filter (Linux).
    Ring = 1,
    /// libpcap through the `pcap` crate (the `pcap` cargo feature).
    Pcap = 2,
}

impl CaptureMethod {
    pub const PCAP_BUILT_IN: bool = cfg!(any(feature = "pcap", not(target_os = "linux")));

    pub fn from_i32(v: i32) -> CaptureMethod {
        match v {
            1 => CaptureMethod::Ring,
            2 => CaptureMethod::Pcap,
            _ => CaptureMethod::Auto,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMethod::Auto => "auto",
            CaptureMethod::Ring => "ring",
            CaptureMethod::Pcap => "pcap",
        }
    }
}

/// One captured frame, borrowed from the ring.
#[derive(Debug)]
pub struct Frame<'a> {
    pub sec: u32,
    pub nsec: u32,
    /// Length on the wire (or of the GRO/TSO super-packet the kernel handled).
    pub len: u32,
    /// The captured bytes, at most snaplen.
    pub data: &'a [u8],
    pub pkttype: u8,
    /// Ethertype from the skb (host order).
    pub protocol: u16,
    pub vlan_tci: Option<u16>,
}

/// Kernel counters, as running totals since the ring was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Frames that passed the filter and were put in the ring.
    pub received: u64,
    /// Frames that passed the filter but found no room in the ring.
    pub dropped: u64,
    /// Times the ring was full (frozen) and had to wait for us.
    pub freezes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Ring blocks (or, for libpcap, batches) handed back.
    pub blocks: u32,
    pub frames: u32,
    /// A block carried TP_STATUS_LOSING: the kernel dropped frames around it.
    pub losing: bool,
    /// Frames whose ring headers pointed outside their block (never seen in practice;
    /// skipped rather than trusted).
    pub malformed: u32,
    /// The call stopped at its bound with packets still waiting: call again soon.
    pub more: bool,
}

/// The libpcap-flavoured settings every backend is opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    pub buffer_size: u32,
    pub snaplen: u32,
    pub timeout_ms: u32,
}

/// Longest interface name Linux allows (IFNAMSIZ - 1).
pub const MAX_DEVICE_NAME: usize = 15;

#[derive(Debug)]
pub enum CaptureError {
    /// The device does not exist (any more); holds the operation that found out.
    NoSuchDevice(&'static str),
    /// The process lacks CAP_NET_RAW.
    Permission(io::Error),
    /// The device is down; holds the operation that found out.
    DeviceDown(&'static str),
    Filter(FilterError),
    /// The chosen capture method does not exist in this build or on this system.
    Unsupported(&'static str),
    Io {
        what: &'static str,
        err: io::Error,
    },
}

impl CaptureError {
    pub fn from_io(what: &'static str, err: io::Error) -> CaptureError {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => CaptureError::Permission(err),
            Some(libc::ENODEV) | Some(libc::ENXIO) => CaptureError::NoSuchDevice(what),
            _ => CaptureError::Io { what, err },
        }
    }
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::NoSuchDevice(what) => write!(f, "no such network device ({what} failed)"),
            CaptureError::Permission(e) => write!(f, "cannot open a packet socket: {e} (CAP_NET_RAW is required)"),
            CaptureError::DeviceDown(what) => write!(f, "network device is down ({what} failed)"),
            CaptureError::Filter(e) => write!(f, "cannot build the packet filter: {e}"),
            CaptureError::Unsupported(why) => write!(f, "{why}"),
            CaptureError::Io { what, err } => write!(f, "{what} failed: {err}"),
        }
    }
}

impl std::error::Error for CaptureError {}

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

/// Most devices captured at once.
pub const MAX_DEVICES: usize = 16;

/// Parses the `pg_netstat.devices` setting: a comma-separated list of interface names,
/// blanks around names ignored. An empty (or all-blank) value means "choose for me".
/// Returns a message fit for a GUC error detail.
pub fn parse_device_list(value: &str) -> Result<Vec<String>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<String> = Vec::new();
    for (i, raw) in value.split(',').enumerate() {
        let name = raw.trim();
        if name.is_empty() {
            return Err(format!(
                "Entry {} of the list is empty; write names separated by single commas, e.g. 'eth0,lo'.",
                i + 1
            ));
        }
        if !valid_device_name(name) {
            return Err(format!(
                "\"{name}\" is not a valid network device name: 1 to {MAX_DEVICE_NAME} characters, no blanks, '/', ':' or ','."
            ));
        }
        if out.iter().any(|d| d == name) {
            return Err(format!("Device \"{name}\" is listed twice."));
        }
        out.push(name.to_string());
    }
    if out.len() > MAX_DEVICES {
        return Err(format!("{} devices are listed; at most {MAX_DEVICES} can be captured.", out.len()));
    }
    Ok(out)
}

/// Parses `pg_netstat.ports`: extra TCP ports (comma-separated) counted together with
/// the server's own port, e.g. a connection pooler's. Empty means none.
pub fn parse_port_list(value: &str) -> Result<Vec<u16>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<u16> = Vec::new();
    for (i, raw) in value.split(',').enumerate() {
        let text = raw.trim();
        if text.is_empty() {
            return Err(format!(
                "Entry {} of the list is empty; write ports separated by single commas, e.g. '6432,6433'.",
                i + 1
            ));
        }
        let port = match text.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => p as u16,
            _ => return Err(format!("\"{text}\" is not a TCP port number (1 to 65535).")),
        };
        if out.contains(&port) {
            return Err(format!("Port {port} is listed twice."));
        }
        out.push(port);
    }
    if out.len() > filter::MAX_PORTS - 1 {
        return Err(format!(
            "{} ports are listed; at most {} can be added to the server's own port.",
            out.len(),
            filter::MAX_PORTS - 1
        ));
    }
    Ok(out)
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// Decides which way a captured frame went, or `None` when it must not be counted.
///
/// Off loopback the kernel knows: PACKET_OUTGOING is what this host sent. On loopback
/// every packet is both sent and received, and the kernel delivers both copies: we keep
/// only the received copy (the filter already drops the other in the kernel; this is
/// the safety net) and decide by which side holds one of our server ports. A connection
/// the server itself opens elsewhere keeps its true direction, because off loopback we
/// never look at ports.
pub fn classify(loopback: bool, pkttype: u8, meta: Option<&packet::PacketMeta>, ports: &[u16]) -> Option<Direction> {
    if !loopback {
        return Some(if pkttype == PACKET_OUTGOING { Direction::Out } else { Direction::In });
    }
    if pkttype == PACKET_OUTGOING {
        return None;
    }
    let m = meta?;
    if ports.contains(&m.src_port) {
        Some(Direction::Out)
    } else if ports.contains(&m.dst_port) {
        Some(Direction::In)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet::PacketMeta;

    fn meta(s: u16, d: u16) -> PacketMeta {
        PacketMeta { src_port: s, dst_port: d, ..PacketMeta::default() }
    }

    #[test]
    fn direction_off_loopback_comes_from_the_kernel() {
        // A walreceiver or postgres_fdw connection the server opens: destination port is
        // 5432 but the packet leaves the host, so it is out.
        assert_eq!(classify(false, PACKET_OUTGOING, Some(&meta(40000, 5432)), &[5432]), Some(Direction::Out));
        assert_eq!(classify(false, 0, Some(&meta(5432, 40000)), &[5432]), Some(Direction::In));
        assert_eq!(classify(false, 0, None, &[5432]), Some(Direction::In));
    }

    #[test]
    fn direction_on_loopback_comes_from_the_server_port() {
        assert_eq!(classify(true, 0, Some(&meta(40000, 5432)), &[5432]), Some(Direction::In));
        assert_eq!(classify(true, 0, Some(&meta(5432, 40000)), &[5432]), Some(Direction::Out));
        assert_eq!(classify(true, 0, Some(&meta(6432, 40000)), &[5432, 6432]), Some(Direction::Out));
        assert_eq!(classify(true, PACKET_OUTGOING, Some(&meta(40000, 5432)), &[5432]), None);
        assert_eq!(classify(true, 0, Some(&meta(1, 2)), &[5432]), None);
        assert_eq!(classify(true, 0, None, &[5432]), None);
    }

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

    #[test]
    fn device_lists() {
        assert_eq!(parse_device_list(""), Ok(vec![]));
        assert_eq!(parse_device_list("  "), Ok(vec![]));
        assert_eq!(parse_device_list("eth0"), Ok(vec!["eth0".to_string()]));
        assert_eq!(parse_device_list(" eth0 , lo "), Ok(vec!["eth0".to_string(), "lo".to_string()]));
        assert!(parse_device_list("eth0,,lo").unwrap_err().contains("Entry 2"));
        assert!(parse_device_list("eth0,").unwrap_err().contains("empty"));
        assert!(parse_device_list("eth0,eth0").unwrap_err().contains("twice"));
        assert!(parse_device_list("a b").unwrap_err().contains("not a valid"));
        assert!(parse_device_list("averyveryverylongname").unwrap_err().contains("1 to 15"));
        let many: Vec<String> = (0..=MAX_DEVICES).map(|i| format!("d{i}")).collect();
        assert!(parse_device_list(&many.join(",")).unwrap_err().contains("at most 16"));
        assert_eq!(parse_device_list(&many[..MAX_DEVICES].join(",")).unwrap().len(), MAX_DEVICES);
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_port_list(""), Ok(vec![]));
        assert_eq!(parse_port_list(" 6432 , 7000"), Ok(vec![6432, 7000]));
        assert!(parse_port_list("6432,,7000").unwrap_err().contains("Entry 2"));
        assert!(parse_port_list("0").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("65536").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("pgbouncer").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("6432,6432").unwrap_err().contains("twice"));
        let many: Vec<String> = (1..=16).map(|i| (6000 + i).to_string()).collect();
        assert!(parse_port_list(&many.join(",")).unwrap_err().contains("at most 15"));
        assert_eq!(parse_port_list(&many[..15].join(",")).unwrap().len(), 15);
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

    /// Differential check on random and mutated frames: whatever the kernel filter lets
    /// through, the parser must find one of the ports in (the worker relies on that to
    /// tell direction on loopback).
    #[test]
    fn parser_agrees_with_every_frame_the_filter_accepts() {
        use crate::capture::testframes::*;
        use filter::{build, run, FilterSpec, SkbMeta};
        let ports = [5432u16, 6432];
        let prog =
            build(&FilterSpec { ports: ports.to_vec(), snaplen: 96, link: LinkLayer::Ethernet, drop_outgoing: false })
                .unwrap();
        let bases = [
            eth_ipv4_tcp(5432, 40000, 0),
            eth_ipv4_tcp(40000, 6432, 24),
            eth_ipv6_tcp(40000, 5432),
            vlan_tagged(&eth_ipv4_tcp(6432, 1, 0), 3),
            vlan_tagged(&eth_ipv6_tcp(5432, 2), 4),
        ];
        let mut next = xorshift(0x2545_f491);
        let (mut accepted, mut rejected) = (0, 0);
        for round in 0..50_000 {
            let mut f = bases[round % bases.len()].clone();
            for _ in 0..(next() % 4) {
                let i = next() as usize % f.len();
                f[i] = next() as u8;
            }
            let meta = SkbMeta { pkttype: 0, protocol: 0 };
            if run(&prog, &f, meta) == Some(96) {
                accepted += 1;
                let m = packet::parse(&f, LinkLayer::Ethernet, 0)
                    .unwrap_or_else(|e| panic!("filter accepted a frame the parser rejects ({e:?}): {f:02x?}"));
                assert!(ports.contains(&m.src_port) || ports.contains(&m.dst_port), "{m:?} {f:02x?}");
            } else {
                rejected += 1;
            }
        }
        assert!(accepted > 10_000 && rejected > 1_000, "mutations too mild or too wild: {accepted}/{rejected}");
    }
}
