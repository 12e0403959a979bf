//! One capture backend per device, chosen by `pg_netstat.capture_method`: the
//! TPACKET_V3 ring, or libpcap where built in. An enum rather than a trait object so the
//! per-packet closure is inlined into each backend's loop.

use super::filter::LinkLayer;
#[cfg(linux_native)]
use super::ring::{Ring, RingGeometry};
use super::{CaptureError, CaptureMethod, CaptureSettings, DeviceInfo, DrainStats, Frame, KernelStats};
use std::io;
use std::os::fd::RawFd;

pub enum Source {
    #[cfg(linux_native)]
    Ring(Ring),
    #[cfg(any(feature = "pcap", not(linux_native)))]
    Pcap(super::pcap::PcapSource),
}

#[cfg(linux_native)]
fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32
}

impl Source {
    /// Opens `device` with `method`. `Auto` takes the ring and falls back to libpcap (when
    /// built in) only for failures libpcap might not share; a missing device or privilege
    /// fails the same way either way.
    pub fn open(
        method: CaptureMethod,
        device: &DeviceInfo,
        ports: &[u16],
        s: CaptureSettings,
    ) -> Result<Source, CaptureError> {
        match method {
            CaptureMethod::Ring => Self::open_ring(device, ports, s),
            CaptureMethod::Pcap => Self::open_pcap(device, ports, s),
            // Without the ring (the portable build), libpcap is the only way: its own
            // error, not the ring's absence, is what the user needs to see.
            CaptureMethod::Auto if !CaptureMethod::RING_BUILT_IN => Self::open_pcap(device, ports, s),
            CaptureMethod::Auto => match Self::open_ring(device, ports, s) {
                Ok(r) => Ok(r),
                Err(e @ (CaptureError::Permission(_) | CaptureError::NoSuchDevice(_))) => Err(e),
                Err(e) if CaptureMethod::PCAP_BUILT_IN => Self::open_pcap(device, ports, s).map_err(|_| e),
                Err(e) => Err(e),
            },
        }
    }

    #[cfg(linux_native)]
    fn open_ring(device: &DeviceInfo, ports: &[u16], s: CaptureSettings) -> Result<Source, CaptureError> {
        let g = RingGeometry::from_pcap_settings(s.buffer_size, s.snaplen, s.timeout_ms, page_size());
        Ring::open(device, ports, g).map(Source::Ring)
    }

    #[cfg(not(linux_native))]
    fn open_ring(_: &DeviceInfo, _: &[u16], _: CaptureSettings) -> Result<Source, CaptureError> {
        Err(CaptureError::Unsupported(
            "this build has no AF_PACKET ring (it is in Linux builds without the portable feature)",
        ))
    }

    #[cfg(any(feature = "pcap", not(linux_native)))]
    fn open_pcap(device: &DeviceInfo, ports: &[u16], s: CaptureSettings) -> Result<Source, CaptureError> {
        super::pcap::PcapSource::open(device, ports, s).map(Source::Pcap)
    }

    #[cfg(not(any(feature = "pcap", not(linux_native))))]
    fn open_pcap(_: &DeviceInfo, _: &[u16], _: CaptureSettings) -> Result<Source, CaptureError> {
        Err(CaptureError::Unsupported("this build has no libpcap backend (build with --features pcap)"))
    }

    pub fn method(&self) -> CaptureMethod {
        match self {
            #[cfg(linux_native)]
            Source::Ring(_) => CaptureMethod::Ring,
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(_) => CaptureMethod::Pcap,
        }
    }

    pub fn fd(&self) -> RawFd {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => r.fd(),
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(p) => p.fd(),
        }
    }

    /// How frames from this source start (where the network header is).
    pub fn link(&self) -> LinkLayer {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => r.link(),
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(p) => p.link(),
        }
    }

    /// Whether the direction of a frame must be read from the ports instead of the
    /// kernel's packet type: always on loopback, and for libpcap where the device has no
    /// hardware address of its own to compare with.
    pub fn direction_by_ports(&self, device: &DeviceInfo) -> bool {
        match self {
            #[cfg(linux_native)]
            Source::Ring(_) => device.loopback,
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(p) => device.loopback || p.direction_by_ports(),
        }
    }

    /// The capture's geometry in words, for the server log: what memory it holds.
    pub fn describe(&self) -> String {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => {
                let g = r.geometry();
                format!(
                    "TPACKET_V3 ring of {} blocks of {} bytes ({} bytes), snaplen {}, block timeout {} ms",
                    g.block_count,
                    g.block_size,
                    g.total_bytes(),
                    g.snaplen,
                    g.retire_ms
                )
            }
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(p) => {
                let s = p.settings();
                format!("libpcap, buffer {} bytes, snaplen {}, timeout {} ms", s.buffer_size, s.snaplen, s.timeout_ms)
            }
        }
    }

    /// The longest the kernel may hold a packet before handing it over.
    pub fn retire_ms(&self) -> u32 {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => r.geometry().retire_ms,
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(p) => p.settings().timeout_ms,
        }
    }

    /// Reads at most one lap (the whole ring, or libpcap's equivalent).
    pub fn drain(&mut self, on_frame: impl FnMut(&Frame<'_>)) -> Result<DrainStats, CaptureError> {
        self.drain_blocks(self.blocks_per_lap(), on_frame)
    }

    /// Reads at most `max_blocks` blocks (for libpcap, that many times
    /// `PCAP_FRAMES_PER_BLOCK` frames): bounded work per call. `more` says more is ready.
    pub fn drain_blocks(
        &mut self,
        max_blocks: u32,
        on_frame: impl FnMut(&Frame<'_>),
    ) -> Result<DrainStats, CaptureError> {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => Ok(r.drain_blocks(max_blocks, on_frame)),
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(p) => p.drain(max_blocks.saturating_mul(super::pcap::PCAP_FRAMES_PER_BLOCK), on_frame),
        }
    }

    /// How many blocks make one lap: the most one `drain` reads.
    pub fn blocks_per_lap(&self) -> u32 {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => r.geometry().block_count,
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(_) => super::pcap::PCAP_BLOCKS_PER_LAP,
        }
    }

    pub fn read_kernel_stats(&mut self) -> io::Result<KernelStats> {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => r.read_kernel_stats(),
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(p) => p.read_kernel_stats(),
        }
    }

    /// Takes a pending socket error (ENETDOWN, ENXIO/ENODEV). libpcap reports those
    /// from its read call instead, so it has nothing here.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            #[cfg(linux_native)]
            Source::Ring(r) => r.take_error(),
            #[cfg(any(feature = "pcap", not(linux_native)))]
            Source::Pcap(_) => Ok(None),
        }
    }
}
