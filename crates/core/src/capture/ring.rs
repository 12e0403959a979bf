//! AF_PACKET socket with a TPACKET_V3 memory-mapped receive ring (Linux only).
//!
//! The kernel fills fixed-size blocks with frames and hands a block to user space when
//! it is full or when `tp_retire_blk_tov` ms have passed since its first frame. We read
//! a block, give it straight back, and move to the next one in order; giving blocks back
//! late or out of order is what freezes a ring.

use super::filter::{self, FilterSpec, LinkLayer, SockFilter};
use super::{CaptureError, DeviceInfo, DrainStats, Frame, KernelStats};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

// <linux/if_packet.h> and <linux/if_ether.h>: kernel ABI, values fixed.
const SOL_PACKET: libc::c_int = 263;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TPACKET_V3: libc::c_int = 2;
const ETH_P_ALL: u16 = 0x0003;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1 << 0;
const TP_STATUS_LOSING: u32 = 1 << 2;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TPACKET_ALIGNMENT: usize = 16;

/// `struct tpacket_req3`
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct TpacketReq3 {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
    retire_blk_tov: u32,
    sizeof_priv: u32,
    feature_req_word: u32,
}

/// `struct tpacket_stats_v3`
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct TpacketStatsV3 {
    packets: u32,
    drops: u32,
    freeze_q_cnt: u32,
}

// Offsets inside `struct tpacket_block_desc` (version, offset_to_priv, then
// `struct tpacket_hdr_v1`).
const BLK_STATUS: usize = 8;
const BLK_NUM_PKTS: usize = 12;
const BLK_FIRST_PKT: usize = 16;
// Offsets inside `struct tpacket3_hdr`.
const PKT_NEXT: usize = 0;
const PKT_SEC: usize = 4;
const PKT_NSEC: usize = 8;
const PKT_SNAPLEN: usize = 12;
const PKT_LEN: usize = 16;
const PKT_STATUS: usize = 20;
const PKT_MAC: usize = 24;
const PKT_VLAN_TCI: usize = 32;
const TPACKET3_HDR_SIZE: usize = 48;
// The `struct sockaddr_ll` the kernel writes after the aligned header.
const SLL_OFFSET: usize = tpacket_align(TPACKET3_HDR_SIZE);
const SLL_PROTOCOL: usize = SLL_OFFSET + 2;
const SLL_PKTTYPE: usize = SLL_OFFSET + 10;
const SLL_SIZE: usize = 20;
const TPACKET3_HDRLEN: usize = SLL_OFFSET + SLL_SIZE;

/// How far ahead of the frame being read to prefetch. Frames are packed one after the
/// other in a block, but each one's position comes from the previous header
/// (`tp_next_offset`), so without a hint every header is a dependent cache miss on memory
/// the kernel just wrote from another CPU. Profiled in docs/performance.md: that load was
/// two thirds of the drain loop's samples; prefetching about six frames ahead cut the
/// loop's CPU by about a quarter.
const PREFETCH_AHEAD: usize = 1024;

#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p; // no stable prefetch hint elsewhere; the loop is correct without it
}

const fn tpacket_align(x: usize) -> usize {
    (x + TPACKET_ALIGNMENT - 1) & !(TPACKET_ALIGNMENT - 1)
}

/// The largest block the kernel accepts is one page-allocator chunk; 4 MiB holds on
/// every common configuration, and we never need more.
const MAX_BLOCK_SIZE: u32 = 4 << 20;
/// Aim for about this many blocks. Fewer, bigger blocks mean fewer wake-ups: the kernel
/// wakes the reader once per block, and on this project's benchmark machine a wake-up of
/// an idle reader costs about as much as draining a few hundred frames. Four blocks still
/// leave three quarters of the ring to the kernel while one is being read, and it is
/// libpcap's own layout for its default buffer (4 blocks of 256 KiB).
const TARGET_BLOCKS: u32 = 4;

/// How a ring is laid out; derived from the libpcap-flavoured settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    pub block_size: u32,
    pub block_count: u32,
    pub frame_size: u32,
    pub retire_ms: u32,
    pub snaplen: u32,
}

impl RingGeometry {
    /// Maps `pcap_buffer_size` (bytes), `pcap_snaplen` (bytes) and `pcap_timeout` (ms)
    /// onto a ring: block size a power of two ≥ the page size and large enough for one
    /// maximal frame, block count rounded up so the ring is never smaller than asked
    /// and at least 2.
    pub fn from_pcap_settings(buffer_size: u32, snaplen: u32, timeout_ms: u32, page_size: u32) -> RingGeometry {
        let frame_size = tpacket_align(TPACKET3_HDRLEN + 16 + snaplen as usize) as u32;
        let block_size = (buffer_size / TARGET_BLOCKS).clamp(1, MAX_BLOCK_SIZE).next_power_of_two();
        let block_size = block_size.max(page_size).max(frame_size.next_power_of_two()).min(MAX_BLOCK_SIZE);
        let block_count = buffer_size.div_ceil(block_size).max(2);
        RingGeometry { block_size, block_count, frame_size, retire_ms: timeout_ms.max(1), snaplen }
    }

    pub fn total_bytes(&self) -> u64 {
        self.block_size as u64 * self.block_count as u64
    }
}

pub struct Ring {
    socket: Socket,
    map: NonNull<u8>,
    geometry: RingGeometry,
    next_block: u32,
    link: LinkLayer,
    stats: KernelStats,
}

// SAFETY: the mapping is owned by this value alone; nothing else aliases it from Rust,
// so moving it to another thread moves its only user.
unsafe impl Send for Ring {}

fn os_err(what: &'static str) -> impl FnOnce(io::Error) -> CaptureError {
    move |err| CaptureError::from_io(what, err)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live, properly sized value of the type the option expects.
    let rc =
        unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Ring {
    /// Opens a ring on `device` that receives only what `spec` accepts.
    pub fn open(device: &DeviceInfo, ports: &[u16], geometry: RingGeometry) -> Result<Ring, CaptureError> {
        let link = device.link;
        let spec =
            FilterSpec { ports: ports.to_vec(), snaplen: geometry.snaplen, link, drop_outgoing: device.loopback };
        let program = filter::build(&spec).map_err(CaptureError::Filter)?;

        // Protocol 0: the socket receives nothing until bound, so no frame from another
        // device or without the filter can slip into the ring first.
        let ty = match link {
            LinkLayer::Ethernet => Type::RAW,
            LinkLayer::Cooked => Type::DGRAM,
        };
        let socket = Socket::new(Domain::PACKET, ty.nonblocking().cloexec(), Some(Protocol::from(0)))
            .map_err(os_err("socket(AF_PACKET)"))?;
        let fd = socket.as_raw_fd();
        setsockopt(fd, SOL_PACKET, PACKET_VERSION, &TPACKET_V3).map_err(os_err("PACKET_VERSION"))?;
        if device.loopback {
            // Loopback hands every packet to a packet socket twice, as sent and as
            // received. Without this the kernel clones each sent one only for our filter
            // to drop it, on the sending CPU — the server's own backends. Linux 4.20+;
            // on older kernels the filter still drops the copy, so failure is harmless.
            let _ = setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &1i32);
        }

        let req = TpacketReq3 {
            block_size: geometry.block_size,
            block_nr: geometry.block_count,
            frame_size: geometry.frame_size,
            frame_nr: (geometry.block_size / geometry.frame_size) * geometry.block_count,
            retire_blk_tov: geometry.retire_ms,
            sizeof_priv: 0,
            feature_req_word: 0,
        };
        setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req).map_err(os_err("PACKET_RX_RING"))?;

        let len = geometry.total_bytes() as usize;
        // SAFETY: a fresh shared mapping of the ring the kernel just allocated for `fd`;
        // the result is checked before use and unmapped exactly once in Drop.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if addr == libc::MAP_FAILED {
            return Err(CaptureError::from_io("mmap ring", io::Error::last_os_error()));
        }
        let map = NonNull::new(addr.cast::<u8>())
            .ok_or(CaptureError::Io { what: "mmap ring", err: io::Error::from(io::ErrorKind::Other) })?;
        // From here on Drop unmaps, whatever fails next.
        let mut ring = Ring { socket, map, geometry, next_block: 0, link, stats: KernelStats::default() };

        let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr() as *mut libc::sock_filter };
        const _: () = assert!(size_of::<SockFilter>() == size_of::<libc::sock_filter>());
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog).map_err(os_err("SO_ATTACH_FILTER"))?;

        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = device.ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and the length matches it.
        let rc = unsafe {
            libc::bind(fd, (&sll as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as libc::socklen_t)
        };
        if rc != 0 {
            return Err(CaptureError::from_io("bind to device", io::Error::last_os_error()));
        }
        // Counters from before the bind belong to nobody: start from zero.
        ring.read_kernel_stats().map_err(os_err("PACKET_STATISTICS"))?;
        ring.stats = KernelStats::default();
        Ok(ring)
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    pub fn link(&self) -> LinkLayer {
        self.link
    }

    /// The start of block `index` in the mapping, or `None` past the last block.
    fn block_ptr(&self, index: u32) -> Option<*mut u8> {
        (index < self.geometry.block_count)
            // SAFETY: index < block_count, so the offset stays inside the mapping of
            // block_count * block_size bytes.
            .then(|| unsafe { self.map.as_ptr().add(index as usize * self.geometry.block_size as usize) })
    }

    /// The status word the kernel and we hand a block over with.
    ///
    /// # Safety
    /// `block` must come from `block_ptr` of this ring, which keeps the mapping (and so
    /// the returned reference) alive for as long as `self` is borrowed.
    unsafe fn block_status(&self, block: *mut u8) -> &AtomicU32 {
        // SAFETY: (caller) `block` starts a block of this mapping; block_status is a
        // 4-byte-aligned u32 at a fixed offset inside it, shared with the kernel, and
        // atomics are how both sides hand the block over.
        unsafe { &*(block.add(BLK_STATUS) as *const AtomicU32) }
    }

    /// Whether block `index` is ready for us to read.
    fn block_ready(&self, index: u32) -> bool {
        // SAFETY: the pointer comes from block_ptr of this ring.
        self.block_ptr(index)
            .is_some_and(|b| unsafe { self.block_status(b) }.load(Ordering::Acquire) & TP_STATUS_USER != 0)
    }

    /// Hands every block the kernel has filled to `on_frame`, then returns it to the
    /// kernel. Reads at most one lap of the ring per call so a flood cannot starve the
    /// caller's other work; the socket stays readable if more is waiting.
    pub fn drain(&mut self, on_frame: impl FnMut(&Frame<'_>)) -> DrainStats {
        self.drain_blocks(self.geometry.block_count, on_frame)
    }

    /// Like `drain`, reading at most `max_blocks` blocks: a caller holding a lock per
    /// call bounds its hold to that many blocks. `more` says the next block is ready.
    pub fn drain_blocks(&mut self, max_blocks: u32, mut on_frame: impl FnMut(&Frame<'_>)) -> DrainStats {
        let mut out = DrainStats::default();
        let bs = self.geometry.block_size as usize;
        for _ in 0..max_blocks.min(self.geometry.block_count) {
            // next_block < block_count always (it wraps below).
            let Some(block) = self.block_ptr(self.next_block) else { break };
            // SAFETY: the pointer comes from block_ptr of this ring.
            let status = unsafe { self.block_status(block) };
            let st = status.load(Ordering::Acquire);
            if st & TP_STATUS_USER == 0 {
                break;
            }
            if st & TP_STATUS_LOSING != 0 {
                out.losing = true;
            }
            // SAFETY: the kernel gave this block to us (TP_STATUS_USER, acquire); until we
            // store TP_STATUS_KERNEL below it does not write to it. All reads stay inside
            // the block: every offset is checked against `bs` first.
            unsafe {
                let read_u32 = |p: *const u8| (p as *const u32).read_unaligned();
                let num = read_u32(block.add(BLK_NUM_PKTS));
                let mut off = read_u32(block.add(BLK_FIRST_PKT)) as usize;
                for _ in 0..num {
                    if off < BLK_FIRST_PKT || off + TPACKET3_HDRLEN > bs {
                        out.malformed += 1;
                        break;
                    }
                    let p = block.add(off);
                    prefetch(p.wrapping_add(PREFETCH_AHEAD));
                    let snap = read_u32(p.add(PKT_SNAPLEN)) as usize;
                    let mac = (p.add(PKT_MAC) as *const u16).read_unaligned() as usize;
                    if mac < TPACKET3_HDRLEN || off + mac + snap > bs {
                        out.malformed += 1;
                    } else {
                        let pst = read_u32(p.add(PKT_STATUS));
                        let tci = read_u32(p.add(PKT_VLAN_TCI));
                        let vlan = pst & TP_STATUS_VLAN_VALID != 0;
                        let frame = Frame {
                            sec: read_u32(p.add(PKT_SEC)),
                            nsec: read_u32(p.add(PKT_NSEC)),
                            // A tag the NIC or kernel moved into metadata was on the wire
                            // (and tcpdump puts it back): count its 4 bytes.
                            len: read_u32(p.add(PKT_LEN)) + if vlan { 4 } else { 0 },
                            data: std::slice::from_raw_parts(p.add(mac), snap),
                            pkttype: *p.add(SLL_PKTTYPE),
                            protocol: u16::from_be((p.add(SLL_PROTOCOL) as *const u16).read_unaligned()),
                            vlan_tci: vlan.then_some(tci as u16),
                        };
                        on_frame(&frame);
                        out.frames += 1;
                    }
                    let next = read_u32(p.add(PKT_NEXT)) as usize;
                    if next == 0 {
                        break;
                    }
                    off += next;
                }
            }
            status.store(TP_STATUS_KERNEL, Ordering::Release);
            out.blocks += 1;
            self.next_block = (self.next_block + 1) % self.geometry.block_count;
        }
        out.more = self.block_ready(self.next_block);
        out
    }

    /// Reads PACKET_STATISTICS and adds it to the running totals. The kernel resets its
    /// counters on every read and counts drops inside its packet count.
    pub fn read_kernel_stats(&mut self) -> io::Result<KernelStats> {
        let mut st = TpacketStatsV3::default();
        let mut len = size_of::<TpacketStatsV3>() as libc::socklen_t;
        // SAFETY: `st` is writable and `len` says how big it is.
        let rc = unsafe {
            libc::getsockopt(
                self.fd(),
                SOL_PACKET,
                PACKET_STATISTICS,
                (&mut st as *mut TpacketStatsV3).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.stats.received += st.packets.saturating_sub(st.drops) as u64;
        self.stats.dropped += st.drops as u64;
        self.stats.freezes += st.freeze_q_cnt as u64;
        Ok(self.stats)
    }

    /// Takes the pending socket error (ENETDOWN when the device went down, ENXIO/ENODEV
    /// when it went away), which also clears it so the socket stops polling as ready.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.socket.take_error()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `map` came from mmap with exactly this length and is unmapped once.
        // Errors cannot be handled here and must not panic in Drop.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.geometry.total_bytes() as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_match_the_kernel_headers() {
        assert_eq!(size_of::<TpacketReq3>(), 28);
        assert_eq!(size_of::<TpacketStatsV3>(), 12);
        assert_eq!(size_of::<libc::sockaddr_ll>(), SLL_SIZE);
        assert_eq!(TPACKET3_HDRLEN, 68);
    }

    #[test]
    fn default_pcap_settings_make_a_ring_at_least_as_big() {
        let g = RingGeometry::from_pcap_settings(1_000_000, 96, 1000, 4096);
        assert_eq!(g.block_size, 256 << 10);
        assert_eq!(g.block_count, 4);
        assert!(g.total_bytes() >= 1_000_000);
        assert_eq!(g.retire_ms, 1000);
        assert_eq!(g.frame_size % 16, 0);
        assert!(g.frame_size as usize >= TPACKET3_HDRLEN + 96);
    }

    #[test]
    fn geometry_bounds() {
        // Tiny buffer: still two page-sized blocks.
        let g = RingGeometry::from_pcap_settings(1, 96, 0, 4096);
        assert_eq!((g.block_size, g.block_count, g.retire_ms), (4096, 2, 1));
        // Big snaplen: a block must hold one whole frame.
        let g = RingGeometry::from_pcap_settings(200_000, 65535, 10, 4096);
        assert!(g.block_size >= g.frame_size);
        assert!(g.total_bytes() >= 200_000);
        // Huge buffer: blocks capped, count grows instead.
        let g = RingGeometry::from_pcap_settings(1 << 30, 96, 10, 4096);
        assert_eq!(g.block_size, MAX_BLOCK_SIZE);
        assert_eq!(g.total_bytes(), 1 << 30);
        for size in [131_070u32, 999_999, 1_000_001, 7_777_777, 90_000_000] {
            let g = RingGeometry::from_pcap_settings(size, 96, 1000, 4096);
            assert!(g.total_bytes() >= size as u64 && g.block_size.is_power_of_two(), "{size}: {g:?}");
            assert!(g.total_bytes() < size as u64 + g.block_size as u64);
        }
    }
}
