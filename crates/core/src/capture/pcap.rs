//! The libpcap backend (the `pcap` cargo feature on Linux; the only backend elsewhere).
//!
//! Opened with the same settings as the ring and the filter `tcp and (port A or ...)`,
//! non-blocking, waited on through its selectable fd. The device's link type (see
//! `linktype`: Ethernet, BSD/macOS loopback, raw IP, Linux cooked) is read once and any
//! other is refused. libpcap hands over Ethernet frames without the kernel's packet type,
//! so the direction is decided the way the kernel decides it: a frame whose source
//! address is the device's own was sent by this host; Linux cooked headers carry the
//! packet type. On loopback (and where the frame says nothing) the server port decides,
//! as with the ring; libpcap itself already drops loopback's outgoing copies.

use super::filter::LinkLayer;
use super::linktype::{self, LinkType};
use super::{CaptureError, CaptureSettings, DeviceInfo, DrainStats, Frame, KernelStats};
use pcap::{Activated, Active, Capture, Linktype};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// libpcap has no blocks the worker could see: this many frames stand for one, so a
/// caller bounding its work in blocks bounds it here too.
pub const PCAP_FRAMES_PER_BLOCK: u32 = 4096;
/// Blocks of one lap (what one unbounded drain reads at most); the worker comes straight
/// back when `more` is set.
pub const PCAP_BLOCKS_PER_LAP: u32 = 16;

pub struct PcapSource {
    cap: Capture<Active>,
    link: PcapLink,
    settings: CaptureSettings,
}

/// How the packets of one libpcap handle become frames: decided once from the handle's
/// link type, then applied to every packet. The live backend and the savefile tests
/// (link types Linux never gives) go through this same code.
#[derive(Clone, Copy, Debug)]
pub struct PcapLink {
    kind: LinkType,
    /// The device's own hardware address (Ethernet only): a frame from it was sent.
    mac: Option<[u8; 6]>,
}

impl PcapLink {
    /// Refuses the link types pg_netstat does not read, rather than miscount them.
    pub fn new(datalink: Linktype, mac: Option<[u8; 6]>) -> Result<PcapLink, CaptureError> {
        match LinkType::from_dlt(datalink.0) {
            Some(kind) => Ok(PcapLink { kind, mac: if kind == LinkType::Ethernet { mac } else { None } }),
            None => Err(CaptureError::UnsupportedLink {
                linktype: datalink.0,
                name: datalink.get_name().unwrap_or_else(|_| "unknown".to_string()),
            }),
        }
    }

    pub fn kind(&self) -> LinkType {
        self.kind
    }

    /// Where the network header of the frames handed on is found.
    pub fn layer(&self) -> LinkLayer {
        self.kind.layer()
    }

    /// Whether direction must come from the ports: the frames say nothing of it (no own
    /// hardware address to compare with, no packet type in a cooked header).
    pub fn direction_by_ports(&self) -> bool {
        match self.kind {
            LinkType::Ethernet => self.mac.is_none(),
            k => !k.has_pkttype(),
        }
    }

    /// One libpcap packet as a frame: its link header read (and, but for Ethernet,
    /// stripped), its length as libpcap reports it, link header included, as tcpdump does.
    #[inline]
    pub fn frame<'a>(&self, p: &pcap::Packet<'a>) -> Frame<'a> {
        let d = linktype::decode(self.kind, p.data, self.mac);
        Frame {
            sec: p.header.ts.tv_sec as u32,
            nsec: (p.header.ts.tv_usec as u32).saturating_mul(1000),
            len: p.header.len,
            data: d.data,
            pkttype: d.pkttype,
            protocol: d.protocol,
            vlan_tci: None,
        }
    }
}

/// Reads at most `max_frames` packets from a libpcap handle, live or a savefile.
pub fn drain_capture<T: Activated + ?Sized>(
    cap: &mut Capture<T>,
    link: &PcapLink,
    max_frames: u32,
    mut on_frame: impl FnMut(&Frame<'_>),
) -> Result<DrainStats, CaptureError> {
    let mut out = DrainStats::default();
    loop {
        if out.frames >= max_frames {
            out.more = true;
            break;
        }
        match cap.next_packet() {
            Ok(p) => {
                on_frame(&link.frame(&p));
                out.frames += 1;
            }
            Err(pcap::Error::TimeoutExpired) | Err(pcap::Error::NoMorePackets) => break,
            Err(e) => return Err(pcap_err("pcap_next_ex", e)),
        }
    }
    out.blocks = out.frames.div_ceil(PCAP_FRAMES_PER_BLOCK);
    Ok(out)
}

fn pcap_err(what: &'static str, e: pcap::Error) -> CaptureError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("permitted") || lower.contains("permission") {
        CaptureError::Permission(io::Error::new(io::ErrorKind::PermissionDenied, text))
    } else if lower.contains("no such device") || lower.contains("doesn't exist") || lower.contains("disappeared") {
        CaptureError::NoSuchDevice(what)
    } else if lower.contains("went down") || lower.contains("network is down") || lower.contains("not up") {
        CaptureError::DeviceDown(what)
    } else {
        CaptureError::Io { what, err: io::Error::other(text) }
    }
}

/// The libpcap filter expression equivalent to our BPF program. libpcap's plain
/// `tcp port` does not look through an in-band 802.1Q tag, hence the `vlan` branch on
/// Ethernet (libpcap refuses `vlan` on the other link types).
pub fn filter_expression(ports: &[u16], kind: LinkType) -> String {
    let alternatives: Vec<String> = ports.iter().map(|p| format!("port {p}")).collect();
    let ports = alternatives.join(" or ");
    if kind.has_vlan() {
        format!("(tcp and ({ports})) or (vlan and tcp and ({ports}))")
    } else {
        format!("tcp and ({ports})")
    }
}

impl PcapSource {
    pub fn open(device: &DeviceInfo, ports: &[u16], settings: CaptureSettings) -> Result<PcapSource, CaptureError> {
        let inactive = Capture::from_device(device.name.as_str())
            .map_err(|e| pcap_err("pcap_create", e))?
            .promisc(false)
            .snaplen(settings.snaplen as i32)
            .buffer_size(settings.buffer_size as i32)
            .timeout(settings.timeout_ms as i32)
            .immediate_mode(false);
        let mut cap = inactive.open().map_err(|e| pcap_err("pcap_activate", e))?;
        let mac = if device.loopback { None } else { device.mac };
        let link = PcapLink::new(cap.get_datalink(), mac)?;
        cap.filter(&filter_expression(ports, link.kind()), true).map_err(|e| pcap_err("pcap_setfilter", e))?;
        if device.loopback {
            // Only the received copy of each loopback packet is wanted; say so, so that
            // libpcap can have the kernel skip the sent copies where it knows how.
            cap.direction(pcap::Direction::In).map_err(|e| pcap_err("pcap_setdirection", e))?;
        }
        let cap = cap.setnonblock().map_err(|e| pcap_err("pcap_setnonblock", e))?;
        Ok(PcapSource { cap, link, settings })
    }

    pub fn fd(&self) -> RawFd {
        self.cap.as_raw_fd()
    }

    pub fn settings(&self) -> CaptureSettings {
        self.settings
    }

    pub fn link(&self) -> LinkLayer {
        self.link.layer()
    }

    /// Whether direction must come from the ports (see `PcapLink::direction_by_ports`).
    pub fn direction_by_ports(&self) -> bool {
        self.link.direction_by_ports()
    }

    /// Reads at most `max_frames` frames.
    pub fn drain(&mut self, max_frames: u32, on_frame: impl FnMut(&Frame<'_>)) -> Result<DrainStats, CaptureError> {
        drain_capture(&mut self.cap, &self.link, max_frames, on_frame)
    }

    /// libpcap keeps its own running totals on Linux; its received count includes drops.
    pub fn read_kernel_stats(&mut self) -> io::Result<KernelStats> {
        let st = self.cap.stats().map_err(|e| io::Error::other(e.to_string()))?;
        Ok(KernelStats {
            received: st.received.saturating_sub(st.dropped) as u64,
            dropped: st.dropped as u64,
            freezes: 0,
        })
    }
}

/// Link types Linux never gives a live capture, through libpcap itself: the test writes
/// savefiles (the classic pcap format, by hand) and reads them back with
/// `Capture::from_file`, through the filter and `drain_capture` the live backend uses,
/// then counts the frames as the worker does.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::testframes::{eth_ipv4_tcp, eth_ipv4_udp, eth_ipv6_tcp};
    use crate::capture::{classify, packet, Direction};
    use crate::counters::Counters;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    const PORT: u16 = 5432;

    /// A savefile of `linktype` with one record per frame (captured whole), written in
    /// the given byte order (libpcap reads either).
    fn savefile(linktype: u32, big_endian: bool, frames: &[Vec<u8>]) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let u32b = |v: u32| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        let u16b = |v: u16| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        let mut out = Vec::new();
        out.extend_from_slice(&u32b(0xa1b2_c3d4));
        out.extend_from_slice(&u16b(2));
        out.extend_from_slice(&u16b(4));
        out.extend_from_slice(&u32b(0)); // thiszone
        out.extend_from_slice(&u32b(0)); // sigfigs
        out.extend_from_slice(&u32b(65535)); // snaplen
        out.extend_from_slice(&u32b(linktype));
        for (i, f) in frames.iter().enumerate() {
            out.extend_from_slice(&u32b(1_700_000_000 + i as u32));
            out.extend_from_slice(&u32b(250_000));
            out.extend_from_slice(&u32b(f.len() as u32)); // captured
            out.extend_from_slice(&u32b(f.len() as u32)); // on the wire
            out.extend_from_slice(f);
        }
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pg_netstat-linktype-{}-{n}.pcap", std::process::id()));
        std::fs::write(&path, out).unwrap();
        path
    }

    /// Reads a savefile the way the live backend reads a device, and counts it as the
    /// worker does (direction from the frame where it says, else from the ports).
    fn count(path: &PathBuf) -> Result<Counters, CaptureError> {
        let mut cap = Capture::from_file(path).unwrap();
        let link = PcapLink::new(cap.get_datalink(), None);
        std::fs::remove_file(path).unwrap();
        let link = link?;
        cap.filter(&filter_expression(&[PORT], link.kind()), true).unwrap();
        let (layer, by_ports) = (link.layer(), link.direction_by_ports());
        let mut c = Counters::default();
        drain_capture(&mut cap, &link, u32::MAX, |f| {
            let meta = packet::parse(f.data, layer, f.protocol).ok();
            if let Some(dir) = classify(by_ports, f.pkttype, meta.as_ref(), &[PORT]) {
                c.add(dir, f.len as u64);
            }
        })?;
        Ok(c)
    }

    /// The IP packet inside an Ethernet test frame.
    fn ip(frame: Vec<u8>) -> Vec<u8> {
        frame[14..].to_vec()
    }

    fn with_header(header: &[u8], packet: &[u8]) -> Vec<u8> {
        [header, packet].concat()
    }

    /// Traffic of one file: two packets in and one out on the port (IPv4 and IPv6), and
    /// one of each kind the filter or the parser must leave out (another port, UDP).
    struct Traffic {
        v4_in: Vec<u8>,
        v4_out: Vec<u8>,
        v6_in: Vec<u8>,
        other_port: Vec<u8>,
        udp: Vec<u8>,
    }

    fn traffic() -> Traffic {
        Traffic {
            v4_in: ip(eth_ipv4_tcp(40000, PORT, 0)),
            v4_out: ip(eth_ipv4_tcp(PORT, 40000, 12)),
            v6_in: ip(eth_ipv6_tcp(40001, PORT)),
            other_port: ip(eth_ipv4_tcp(40002, 6543, 0)),
            udp: ip(eth_ipv4_udp(40003, PORT)),
        }
    }

    fn expect(frames: &[&Vec<u8>], dirs: &[Direction]) -> Counters {
        let mut c = Counters::default();
        for (f, d) in frames.iter().zip(dirs) {
            c.add(*d, f.len() as u64);
        }
        c
    }

    /// DLT_NULL and DLT_LOOP: a 4-byte address family, in the capturing host's byte
    /// order for NULL (a savefile written by a big-endian host is big-endian throughout)
    /// and in network order for LOOP, whatever the file's order; IPv6 under the number of
    /// each BSD and of macOS. (Linux's AF_INET6, 10, and a NULL header in the other order
    /// than its file, never occur live; `linktype` reads them too, but libpcap's own
    /// `tcp` filter for these link types does not pass them.)
    #[test]
    fn null_and_loop_in_both_byte_orders_and_every_ipv6_family() {
        let t = traffic();
        for (dlt, v6_family) in [(0u32, 24u32), (0, 28), (0, 30), (108, 24), (108, 28), (108, 30)] {
            for file_be in [false, true] {
                let header_be = dlt == 108 || file_be;
                let af = |v: u32| if header_be { v.to_be_bytes() } else { v.to_le_bytes() };
                let frames = [
                    with_header(&af(2), &t.v4_in),
                    with_header(&af(2), &t.v4_out),
                    with_header(&af(v6_family), &t.v6_in),
                    with_header(&af(2), &t.other_port),
                    with_header(&af(2), &t.udp),
                    // Not IP at all (AF_UNIX): never counted.
                    with_header(&af(1), &t.v4_in),
                ];
                let got = count(&savefile(dlt, file_be, &frames)).unwrap();
                let want =
                    expect(&[&frames[0], &frames[1], &frames[2]], &[Direction::In, Direction::Out, Direction::In]);
                assert_eq!(got, want, "link type {dlt}, IPv6 family {v6_family}, file BE {file_be}");
                assert_eq!((got.packets_in, got.packets_out), (2, 1));
            }
        }
    }

    /// DLT_RAW under both numbers a savefile may carry (12, and LINKTYPE_RAW 101; libpcap
    /// refuses 14, OpenBSD's live DLT_RAW, in a savefile: `linktype`'s tests cover it).
    #[test]
    fn raw_under_every_number() {
        let t = traffic();
        for dlt in [12u32, 101] {
            let frames = [t.v4_in.clone(), t.v4_out.clone(), t.v6_in.clone(), t.other_port.clone(), t.udp.clone()];
            let got = count(&savefile(dlt, false, &frames)).unwrap();
            let want = expect(&[&frames[0], &frames[1], &frames[2]], &[Direction::In, Direction::Out, Direction::In]);
            assert_eq!(got, want, "link type {dlt}");
        }
    }

    /// Linux cooked headers carry the packet type: direction comes from it, not from the
    /// ports (a connection the server opened elsewhere, to port 5432, is out).
    #[test]
    fn linux_sll_and_sll2_take_direction_from_the_packet_type() {
        let t = traffic();
        let sll = |pkttype: u16, proto: u16| {
            let mut h = vec![0u8; 16];
            h[0..2].copy_from_slice(&pkttype.to_be_bytes());
            h[2..4].copy_from_slice(&1u16.to_be_bytes()); // ARPHRD_ETHER
            h[4..6].copy_from_slice(&6u16.to_be_bytes());
            h[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            h[14..16].copy_from_slice(&proto.to_be_bytes());
            h
        };
        let sll2 = |pkttype: u8, proto: u16| {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&proto.to_be_bytes());
            h[4..8].copy_from_slice(&3u32.to_be_bytes()); // ifindex
            h[8..10].copy_from_slice(&1u16.to_be_bytes());
            h[10] = pkttype;
            h[11] = 6;
            h
        };
        for dlt in [113u32, 276] {
            let h =
                |pkttype: u8, proto: u16| if dlt == 113 { sll(pkttype as u16, proto) } else { sll2(pkttype, proto) };
            let frames = [
                with_header(&h(0, 0x0800), &t.v4_in),
                with_header(&h(4, 0x0800), &t.v4_out),
                with_header(&h(0, 0x86dd), &t.v6_in),
                // Sent by this host to someone else's port 5432.
                with_header(&h(4, 0x0800), &t.v4_in),
                with_header(&h(0, 0x0800), &t.other_port),
                with_header(&h(0, 0x0800), &t.udp),
            ];
            let got = count(&savefile(dlt, dlt == 276, &frames)).unwrap();
            let want = expect(
                &[&frames[0], &frames[1], &frames[2], &frames[3]],
                &[Direction::In, Direction::Out, Direction::In, Direction::Out],
            );
            assert_eq!(got, want, "link type {dlt}");
        }
    }

    /// Ethernet as libpcap gives it, without an own address: direction from the ports.
    #[test]
    fn ethernet_savefile() {
        let frames = [eth_ipv4_tcp(40000, PORT, 0), eth_ipv6_tcp(PORT, 40000), eth_ipv4_tcp(1, 2, 0)];
        let got = count(&savefile(1, false, &frames)).unwrap();
        assert_eq!(got, expect(&[&frames[0], &frames[1]], &[Direction::In, Direction::Out]));
    }

    /// Any other link type (PPP here) is refused with the reason, never counted.
    #[test]
    fn other_link_types_are_refused() {
        let frames = [with_header(&[0xff, 0x03, 0x00, 0x21], &traffic().v4_in)];
        let err = count(&savefile(9, false, &frames)).unwrap_err();
        assert!(matches!(err, CaptureError::UnsupportedLink { linktype: 9, .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "libpcap gives link type 9 (PPP) on this device, which pg_netstat cannot read (it reads EN10MB, \
             NULL, LOOP, RAW, LINUX_SLL and LINUX_SLL2); the device is not captured"
        );
    }
}
