//! The libpcap backend (the `pcap` cargo feature on Linux; the only backend elsewhere).
//!
//! Opened with the same settings as the ring and the filter `tcp and (port A or ...)`,
//! non-blocking, waited on through its selectable fd. libpcap hands over Ethernet frames
//! without the kernel's packet type, so the direction is decided the way the kernel
//! decides it: a frame whose source address is the device's own was sent by this host.
//! On loopback (and on devices without an Ethernet header) the server port decides, as
//! with the ring; libpcap itself already drops loopback's outgoing copies.

use super::filter::{LinkLayer, ETHERTYPE_IPV4, ETHERTYPE_IPV6, PACKET_HOST, PACKET_OUTGOING};
use super::{CaptureError, CaptureSettings, DeviceInfo, DrainStats, Frame, KernelStats};
use pcap::{Active, Capture, Linktype};
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
    link: LinkLayer,
    mac: Option<[u8; 6]>,
    settings: CaptureSettings,
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
/// `tcp port` does not look through an in-band 802.1Q tag, hence the `vlan` branch.
pub fn filter_expression(ports: &[u16]) -> String {
    let alternatives: Vec<String> = ports.iter().map(|p| format!("port {p}")).collect();
    let ports = alternatives.join(" or ");
    format!("(tcp and ({ports})) or (vlan and tcp and ({ports}))")
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
        let link = match cap.get_datalink() {
            Linktype::ETHERNET => LinkLayer::Ethernet,
            Linktype::RAW | Linktype(12) => LinkLayer::Cooked,
            other => {
                return Err(CaptureError::Io {
                    what: "pcap_datalink",
                    err: io::Error::other(format!("link type {} is not supported", other.0)),
                })
            }
        };
        cap.filter(&filter_expression(ports), true).map_err(|e| pcap_err("pcap_setfilter", e))?;
        if device.loopback {
            // Only the received copy of each loopback packet is wanted; say so, so that
            // libpcap can have the kernel skip the sent copies where it knows how.
            cap.direction(pcap::Direction::In).map_err(|e| pcap_err("pcap_setdirection", e))?;
        }
        let cap = cap.setnonblock().map_err(|e| pcap_err("pcap_setnonblock", e))?;
        let mac = if device.loopback { None } else { device.mac };
        Ok(PcapSource { cap, link, mac, settings })
    }

    pub fn fd(&self) -> RawFd {
        self.cap.as_raw_fd()
    }

    pub fn settings(&self) -> CaptureSettings {
        self.settings
    }

    pub fn link(&self) -> LinkLayer {
        self.link
    }

    /// Whether direction must come from the ports (no own hardware address to compare).
    pub fn direction_by_ports(&self) -> bool {
        self.mac.is_none()
    }

    /// Reads at most `max_frames` frames.
    pub fn drain(&mut self, max_frames: u32, mut on_frame: impl FnMut(&Frame<'_>)) -> Result<DrainStats, CaptureError> {
        let mut out = DrainStats::default();
        loop {
            if out.frames >= max_frames {
                out.more = true;
                break;
            }
            match self.cap.next_packet() {
                Ok(p) => {
                    let d = p.data;
                    let (pkttype, protocol) = match self.link {
                        LinkLayer::Ethernet => {
                            let sent = self.mac.is_some_and(|m| d.get(6..12) == Some(&m[..]));
                            let proto = d.get(12..14).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                            (if sent { PACKET_OUTGOING } else { PACKET_HOST }, proto)
                        }
                        LinkLayer::Cooked => {
                            let proto =
                                if d.first().is_some_and(|b| b >> 4 == 6) { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
                            (PACKET_HOST, proto)
                        }
                    };
                    let frame = Frame {
                        sec: p.header.ts.tv_sec as u32,
                        nsec: (p.header.ts.tv_usec as u32).saturating_mul(1000),
                        len: p.header.len,
                        data: d,
                        pkttype,
                        protocol,
                        vlan_tci: None,
                    };
                    on_frame(&frame);
                    out.frames += 1;
                }
                Err(pcap::Error::TimeoutExpired) | Err(pcap::Error::NoMorePackets) => break,
                Err(e) => return Err(pcap_err("pcap_next_ex", e)),
            }
        }
        out.blocks = out.frames.div_ceil(PCAP_FRAMES_PER_BLOCK);
        Ok(out)
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
