//! Capture tier: a real TPACKET_V3 ring on `lo`, real TCP traffic, and an independent
//! count of the same traffic from a plain AF_PACKET socket (no ring, no BPF, its own
//! parser). Needs CAP_NET_RAW (CI runs as root); without it the test fails loudly
//! unless PG_NETSTAT_SKIP_CAPTURE_TESTS=1 says to skip. The witness is a Linux packet
//! socket; the ring tests run in the Linux-native build, the libpcap one in any build
//! with libpcap (the `portable` build too).

#![cfg(target_os = "linux")]

#[cfg(linux_native)]
use pg_netstat_core::capture::ring::{Ring, RingGeometry};
use pg_netstat_core::capture::source::Source;
use pg_netstat_core::capture::{classify, device_info, packet, CaptureMethod, CaptureSettings, Direction};
use pg_netstat_core::counters::Counters;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The same counters the worker keeps.
type Tally = Counters;

fn have_capture_rights() -> bool {
    // SAFETY: plain socket call; the fd is closed right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd >= 0 {
        // SAFETY: the fd was opened just above and is closed once.
        unsafe { libc::close(fd) };
        return true;
    }
    false
}

fn skip_or_fail() -> bool {
    if have_capture_rights() {
        return false;
    }
    if std::env::var("PG_NETSTAT_SKIP_CAPTURE_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: no CAP_NET_RAW and PG_NETSTAT_SKIP_CAPTURE_TESTS=1");
        return true;
    }
    panic!("capture tests need CAP_NET_RAW (run as root), or set PG_NETSTAT_SKIP_CAPTURE_TESTS=1");
}

/// The independent witness: a plain packet socket bound to `lo` that sees every copy.
struct PlainSocket(OwnedFd);

impl PlainSocket {
    fn open(ifindex: u32) -> PlainSocket {
        // SAFETY: plain socket calls; the fd is checked before it is owned, and the
        // sockaddr_ll passed to bind is a valid value of its size.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            );
            assert!(fd >= 0, "plain packet socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let size: libc::c_int = 32 << 20;
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&size as *const i32).cast(), 4);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind plain socket: {}", std::io::Error::last_os_error());
            PlainSocket(fd)
        }
    }

    /// Counts frames of TCP connections on `port`, skipping loopback's outgoing copies,
    /// with a parser written separately from the one under test. Returns the tally and
    /// the number of TCP frames on other ports it saw (the noise that must not count).
    fn tally(&self, port: u16) -> (Tally, u64) {
        let mut t = Tally::default();
        let mut noise = 0;
        let mut buf = vec![0u8; 1 << 18];
        loop {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut alen = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `sll` are writable for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut alen,
                )
            };
            if n < 0 {
                break;
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let len = n as usize;
            let f = &buf[..len.min(buf.len())];
            let Some((sport, dport)) = tcp_ports(f) else { continue };
            if sport == port {
                t.add(Direction::Out, len as u64);
            } else if dport == port {
                t.add(Direction::In, len as u64);
            } else {
                noise += 1;
            }
        }
        (t, noise)
    }
}

fn tcp_ports(f: &[u8]) -> Option<(u16, u16)> {
    let be16 = |o: usize| f.get(o..o + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (proto, l4) = match be16(12)? {
        0x0800 => (*f.get(23)?, 14 + (*f.get(14)? as usize & 0x0f) * 4),
        0x86dd => (*f.get(20)?, 54),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    Some((be16(l4)?, be16(l4 + 2)?))
}

/// A small echo exchange: the client sends `rounds` messages of growing size and reads
/// each echo back, then both sides close.
fn exchange(listener: &TcpListener, addr: std::net::SocketAddr, rounds: usize) {
    let server = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 70_000];
            loop {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                c.write_all(&buf[..n]).unwrap();
            }
        });
        let mut c = TcpStream::connect(addr).unwrap();
        for i in 0..rounds {
            let msg = vec![b'x'; 1 + i * 997 % 60_000];
            c.write_all(&msg).unwrap();
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).unwrap();
        }
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        h.join()
    });
    server.unwrap();
}

fn drain_source(src: &mut Source, port: u16, device: &pg_netstat_core::capture::DeviceInfo) -> (Tally, u64) {
    let mut t = Tally::default();
    let mut foreign = 0;
    let link = src.link();
    let loopback = src.direction_by_ports(device);
    src.drain(|f| {
        let meta = packet::parse(f.data, link, f.protocol).ok();
        match meta {
            Some(m) if m.src_port == port || m.dst_port == port => {}
            _ => {
                foreign += 1;
                return;
            }
        }
        if let Some(dir) = classify(loopback, f.pkttype, meta.as_ref(), &[port]) {
            t.add(dir, f.len as u64);
        }
    })
    .expect("drain");
    (t, foreign)
}

#[cfg(linux_native)]
#[test]
fn ring_on_lo_counts_exactly_what_a_plain_socket_sees() {
    if skip_or_fail() {
        return;
    }
    on_lo_counts_exactly_what_a_plain_socket_sees(CaptureMethod::Ring);
}

#[cfg(feature = "pcap")]
#[test]
fn pcap_on_lo_counts_exactly_what_a_plain_socket_sees() {
    if skip_or_fail() {
        return;
    }
    on_lo_counts_exactly_what_a_plain_socket_sees(CaptureMethod::Pcap);
}

fn on_lo_counts_exactly_what_a_plain_socket_sees(method: CaptureMethod) {
    let lo = device_info("lo").unwrap().expect("lo");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener6 = TcpListener::bind(("::1", port)).ok();
    let noise = TcpListener::bind("127.0.0.1:0").unwrap();

    let settings = CaptureSettings { buffer_size: 4 << 20, snaplen: 96, timeout_ms: 20 };
    let mut ring = Source::open(method, &lo, &[port], settings).expect("open capture on lo");
    assert_eq!(ring.method(), method);
    let witness = PlainSocket::open(lo.ifindex);

    exchange(&listener, listener.local_addr().unwrap(), 40);
    if let Some(l6) = &listener6 {
        exchange(l6, l6.local_addr().unwrap(), 15);
    }
    exchange(&noise, noise.local_addr().unwrap(), 25);

    // Let the last FIN/ACKs pass and the retire timer hand over the partly filled block.
    std::thread::sleep(Duration::from_millis(300));
    let mut got = Tally::default();
    let mut foreign = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (want, noise_seen) = witness.tally(port);
    while Instant::now() < deadline {
        let (t, f) = drain_source(&mut ring, port, &lo);
        got.packets_in += t.packets_in;
        got.packets_out += t.packets_out;
        got.bytes_in += t.bytes_in;
        got.bytes_out += t.bytes_out;
        foreign += f;
        if got == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = ring.read_kernel_stats().unwrap();
    eprintln!("{method:?}: {got:?}; plain socket: {want:?}; noise frames seen by the witness: {noise_seen}; kernel: {stats:?}");

    assert!(want.packets_in >= 40 && want.packets_out >= 40, "too little traffic seen: {want:?}");
    assert!(noise_seen > 0, "the noise connection should have been visible to the witness");
    assert_eq!(foreign, 0, "frames of other ports reached the ring");
    assert_eq!(stats.dropped, 0);
    assert_eq!(got, want);
    let counted = got.packets_in + got.packets_out;
    match method {
        // Our filter drops loopback's outgoing copy in the kernel: one copy per packet.
        CaptureMethod::Ring => assert_eq!(stats.received, counted),
        // libpcap's filter lets both copies through and drops one in user space.
        _ => assert_eq!(stats.received, 2 * counted),
    }
}

#[cfg(linux_native)]
#[test]
fn snaplen_truncates_the_copy_but_not_the_count() {
    if skip_or_fail() {
        return;
    }
    let lo = device_info("lo").unwrap().expect("lo");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let geometry = RingGeometry::from_pcap_settings(4 << 20, 96, 20, 4096);
    let mut ring = Ring::open(&lo, &[port], geometry).unwrap();
    exchange(&listener, listener.local_addr().unwrap(), 10);
    std::thread::sleep(Duration::from_millis(300));
    let mut max_captured = 0usize;
    let mut max_len = 0u32;
    ring.drain(|f| {
        max_captured = max_captured.max(f.data.len());
        max_len = max_len.max(f.len);
    });
    assert!(max_captured <= 96, "captured {max_captured} bytes, snaplen is 96");
    assert!(max_len > 5000, "the 9 KB messages should show their full length, saw {max_len}");
}

#[cfg(linux_native)]
#[test]
fn opening_a_missing_device_is_a_clean_error() {
    if skip_or_fail() {
        return;
    }
    assert_eq!(device_info("pgn-missing9").unwrap(), None);
    let mut fake = device_info("lo").unwrap().unwrap();
    fake.ifindex = 999_999;
    let err = Ring::open(&fake, &[5432], RingGeometry::from_pcap_settings(1 << 20, 96, 100, 4096));
    let msg = err.err().expect("bind to a missing ifindex must fail").to_string();
    assert!(msg.contains("no such network device (bind to device failed)"), "{msg}");
}
