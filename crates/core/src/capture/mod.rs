//! Packet capture, free of PostgreSQL: the in-kernel filter, the TPACKET_V3 ring (or
//! libpcap), header parsing, the direction rule and the shared types; device queries
//! are in `device`. The worker and the benchmark both drive
//! it; plain `cargo test` covers it.

pub mod device;
pub mod field;
pub mod filter;
pub mod linktype;
pub mod packet;
#[cfg(any(feature = "pcap", not(linux_native)))]
pub mod pcap;
#[cfg(linux_native)]
pub mod ring;
pub mod source;
#[cfg(test)]
pub(crate) mod testframes;

pub use device::{default_device, device_info, list_devices, valid_device_name, DeviceInfo};
use filter::{FilterError, PACKET_OUTGOING};
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
    pub const PCAP_BUILT_IN: bool = cfg!(any(feature = "pcap", not(linux_native)));
    /// The ring is in Linux-native builds only (not in the `portable` one).
    pub const RING_BUILT_IN: bool = cfg!(linux_native);

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

/// What a capture that failed for want of privilege lacks. Only the Linux-native build
/// manages the privilege (CAP_NET_RAW, see privileges.rs); the portable build names what
/// libpcap needs on each kind of system and leaves it to the administrator.
pub const PRIVILEGE_MISSING: &str = if cfg!(linux_native) {
    "CAP_NET_RAW missing"
} else {
    "no capture privilege: libpcap needs CAP_NET_RAW on Linux, read access to /dev/bpf* on BSD and macOS"
};

/// Longest interface name Linux allows (IFNAMSIZ - 1).
pub const MAX_DEVICE_NAME: usize = 15;

#[derive(Debug)]
pub enum CaptureError {
    /// The device does not exist (any more); holds the operation that found out.
    NoSuchDevice(&'static str),
    /// The process lacks CAP_NET_RAW (or, off Linux, access to libpcap's devices).
    Permission(io::Error),
    /// The device is down; holds the operation that found out.
    DeviceDown(&'static str),
    Filter(FilterError),
    /// The chosen capture method does not exist in this build or on this system.
    Unsupported(&'static str),
    /// libpcap gives frames of a link type pg_netstat does not read (number, name).
    UnsupportedLink {
        linktype: i32,
        name: String,
    },
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
            CaptureError::Permission(e) => write!(f, "cannot open a packet socket: {e} ({PRIVILEGE_MISSING})"),
            CaptureError::DeviceDown(what) => write!(f, "network device is down ({what} failed)"),
            CaptureError::Filter(e) => write!(f, "cannot build the packet filter: {e}"),
            CaptureError::Unsupported(why) => write!(f, "{why}"),
            CaptureError::UnsupportedLink { linktype, name } => write!(
                f,
                "libpcap gives link type {linktype} ({name}) on this device, which pg_netstat cannot read \
                 (it reads {}); the device is not captured",
                linktype::SUPPORTED
            ),
            CaptureError::Io { what, err } => write!(f, "{what} failed: {err}"),
        }
    }
}

impl std::error::Error for CaptureError {}

/// Most devices captured at once.
pub const MAX_DEVICES: usize = 16;

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
/// Whether `port` is one of ours. A loop the compiler inlines: the list is short (one
/// or a few ports), and the out-of-line `slice::contains` call cost more than the search.
#[inline]
#[allow(clippy::manual_contains)] // on purpose: see above (callgrind: 42 instructions a packet saved)
pub fn is_ours(ports: &[u16], port: u16) -> bool {
    ports.iter().any(|&p| p == port)
}

pub fn classify(loopback: bool, pkttype: u8, meta: Option<&packet::PacketMeta>, ports: &[u16]) -> Option<Direction> {
    if !loopback {
        return Some(if pkttype == PACKET_OUTGOING { Direction::Out } else { Direction::In });
    }
    if pkttype == PACKET_OUTGOING {
        return None;
    }
    let m = meta?;
    if is_ours(ports, m.src_port) {
        Some(Direction::Out)
    } else if is_ours(ports, m.dst_port) {
        Some(Direction::In)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter::LinkLayer;
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
