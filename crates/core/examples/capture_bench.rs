//! Capture benchmark engine, without PostgreSQL (driven by scripts/bench).
//!
//!   capture_bench send IFACE PORT NOISE_PORT RATE COUNT
//!       From inside the test namespace: COUNT TCP frames to PORT at RATE frames/s
//!       (0 = as fast as possible), sizes cycling 64..1500 bytes, every fifth frame to
//!       NOISE_PORT instead (the filter must drop those in the kernel). Prints JSON.
//!   capture_bench capture METHOD IFACE PORT SECONDS [BUFFER_BYTES]
//!       METHOD = ring | ring-parse | ring-account | pcap | original (ring-parse adds the
//!       header parse per frame, ring-account the worker's whole per-frame work). Counts for SECONDS, then prints JSON with the
//!       packets counted, kernel drops, CPU seconds (user, system) and peak RSS.
//!       `original` models supabase/pg_netstat: two libpcap handles (dst port / src
//!       port), 1 MB buffer, drained once per second.
//!   capture_bench account COUNT
//!       The collector's per-packet work alone, in memory (no kernel, no PostgreSQL):
//!       COUNT frames of the same TCP stream through header parsing, the direction rule,
//!       interval bucketing and the flow table, as the worker does for each frame.
//!       Prints nanoseconds per frame; a clean target for `perf record`.

use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: capture_bench send IFACE PORT NOISE_PORT RATE COUNT | capture METHOD IFACE PORT SECONDS [BUFFER] | account COUNT"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("send") => send(&args[2], arg(&args, 3), arg(&args, 4), arg(&args, 5), arg(&args, 6)),
        Some("account") => account(arg(&args, 2)),
        Some("capture") => {
            capture(&args[2], &args[3], arg(&args, 4), arg(&args, 5), args.get(6).and_then(|b| b.parse().ok()))
        }
        _ => usage(),
    }
}

/// Payload sizes giving frames of 64 to 1500 bytes (14 + 20 + 20 + payload).
const PAYLOADS: [usize; 6] = [10, 100, 300, 700, 1100, 1446];

/// The sending process's client port: a new connection for every `send`. Reusing one
/// 4-tuple with the sequence numbers starting over would make each later run a stream of
/// retransmissions to anything tracking TCP (the collector did extra work for them, and
/// more with every run).
fn client_port() -> u16 {
    (20_000 + std::process::id() % 40_000) as u16
}

fn frame(src_mac: [u8; 6], dport: u16, payload: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x99]; // another host's MAC: no reply from the receiver
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0, 169, 254, 77, 2, 169, 254, 77, 1]);
    f.extend_from_slice(&client_port().to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 4, 0, 0, 0, 0, 0]);
    f.resize(f.len() + payload, b'x');
    f
}

fn send(iface: &str, port: u16, noise_port: u16, rate: u64, count: u64) {
    let info = pg_netstat_core::capture::device_info(iface).ok().flatten().unwrap_or_else(|| {
        eprintln!("no device {iface}");
        std::process::exit(1)
    });
    // SAFETY: plain socket calls on a socket owned here; the buffers outlive the calls.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = info.ifindex as i32;
    sll.sll_halen = 6;
    let mac = info.mac.unwrap_or([2, 0, 0, 0, 0, 2]);
    let mut frames: Vec<(Vec<u8>, bool)> = (0..PAYLOADS.len() * 5)
        .map(|i| {
            let noise = i % 5 == 4;
            (frame(mac, if noise { noise_port } else { port }, PAYLOADS[i % PAYLOADS.len()]), noise)
        })
        .collect();
    let (mut sent, mut bytes, mut noise_sent, mut seq) = (0u64, 0u64, 0u64, 1u32);
    let start = Instant::now();
    for i in 0..count {
        if let Some(gap_ns) = (i * 1_000_000_000).checked_div(rate) {
            let due = start + Duration::from_nanos(gap_ns);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        }
        let n = frames.len();
        let (f, noise) = &mut frames[i as usize % n];
        // One TCP stream: each segment starts where the last one ended, as in a real
        // transfer (the capture's flow bookkeeping sees new data, not repeats).
        if !*noise {
            f[38..42].copy_from_slice(&seq.to_be_bytes());
            seq = seq.wrapping_add((f.len() - 54) as u32);
        }
        let (f, noise) = (&*f, *noise);
        // SAFETY: `f` is a live buffer of f.len() bytes and `sll` a valid sockaddr_ll.
        let rc = unsafe {
            libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            continue;
        }
        if noise {
            noise_sent += 1;
        } else {
            sent += 1;
            bytes += f.len() as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"sent\": {sent}, \"bytes\": {bytes}, \"noise\": {noise_sent}, \"seconds\": {secs:.3}, \"rate\": {:.0}}}",
        (sent + noise_sent) as f64 / secs
    );
}

fn wakeups() -> i64 {
    // SAFETY: rusage is plain data (all-zero valid) and getrusage writes only into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_nvcsw
}

fn rusage() -> (f64, f64, i64) {
    // SAFETY: rusage is plain data (all-zero valid) and getrusage writes only into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    // Peak RSS from VmHWM: ru_maxrss survives exec and would show the parent's peak.
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    (t(ru.ru_utime), t(ru.ru_stime), hwm)
}

/// Prints the result. CPU is counted from `ready` (after the capture is open) so the
/// figures are the cost of capturing, not of starting a process and mapping a ring;
/// that setup cost is reported on its own.
fn report(method: &str, packets: u64, bytes: u64, drops: u64, at_ready: (f64, f64, i64)) {
    let (user, system, maxrss_kb) = rusage();
    let (user, system, setup) = (user - at_ready.0, system - at_ready.1, at_ready.0 + at_ready.1);
    let wakeups = wakeups();
    println!(
        "{{\"method\": \"{method}\", \"packets\": {packets}, \"bytes\": {bytes}, \"kernel_drops\": {drops}, \"cpu_user\": {user:.6}, \"cpu_system\": {system:.6}, \"cpu_setup\": {setup:.6}, \"wakeups\": {wakeups}, \"max_rss_kb\": {maxrss_kb}}}"
    );
}

fn capture(method: &str, iface: &str, port: u16, seconds: u64, buffer: Option<u32>) {
    use pg_netstat_core::capture::{source::Source, CaptureMethod, CaptureSettings};
    let info = pg_netstat_core::capture::device_info(iface).ok().flatten().unwrap_or_else(|| usage());
    let settings = CaptureSettings { buffer_size: buffer.unwrap_or(1_000_000), snaplen: 96, timeout_ms: 1000 };
    if method == "original" {
        return original(&info, port, seconds);
    }
    // ring-parse and ring-account read the same ring as `ring`, adding the worker's work
    // frame by frame: the header parse alone, or all of it (see Accountant).
    let (m, work) = match method {
        "ring" => (CaptureMethod::Ring, Work::Count),
        "ring-parse" => (CaptureMethod::Ring, Work::Parse),
        "ring-account" => (CaptureMethod::Ring, Work::Account),
        "pcap" => (CaptureMethod::Pcap, Work::Count),
        _ => usage(),
    };

    let mut acc = Accountant::new(port, 0);
    let loopback = info.loopback;
    let mut src = Source::open(m, &info, &[port], settings).unwrap_or_else(|e| {
        eprintln!("open: {e}");
        std::process::exit(1)
    });
    println!("ready");
    let at_ready = rusage();
    let (mut packets, mut bytes) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let mut pfd = libc::pollfd { fd: src.fd(), events: libc::POLLIN, revents: 0 };
        // Like the worker, wake for data, not on a short timer (it wakes at interval
        // boundaries and for a 5 s health check).
        // SAFETY: one valid pollfd, and the count says one.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        let mut last_sec = 0;
        let _ = src.drain(|f| {
            packets += 1;
            bytes += f.len as u64;
            work.run(&mut acc, f, loopback);
            last_sec = f.sec as i64;
        });
        acc.tick(last_sec);
    }
    let _ = src.drain(|f| {
        packets += 1;
        bytes += f.len as u64;
        work.run(&mut acc, f, loopback);
    });
    let drops = src.read_kernel_stats().map(|s| s.dropped).unwrap_or(0);
    report(method, packets, bytes, drops, at_ready);
}

#[cfg(feature = "pcap")]
fn original(info: &pg_netstat_core::capture::DeviceInfo, port: u16, seconds: u64) {
    let open = |dir: &str| {
        let mut c = pcap::Capture::from_device(info.name.as_str())
            .and_then(|c| c.buffer_size(1_000_000).snaplen(96).timeout(1000).open())
            .and_then(|c| c.setnonblock())
            .unwrap_or_else(|e| {
                eprintln!("pcap: {e}");
                std::process::exit(1)
            });
        c.filter(&format!("tcp and {dir} port {port}"), true).unwrap_or_else(|e| {
            eprintln!("filter: {e}");
            std::process::exit(1)
        });
        c
    };
    let (mut cin, mut cout) = (open("dst"), open("src"));
    println!("ready");
    let at_ready = rusage();
    let (mut packets, mut bytes) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(seconds);
    loop {
        for c in [&mut cin, &mut cout] {
            while let Ok(p) = c.next_packet() {
                packets += 1;
                bytes += p.header.len as u64;
            }
        }
        if Instant::now() >= end {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let drops = [&mut cin, &mut cout].into_iter().filter_map(|c| c.stats().ok()).map(|s| s.dropped as u64).sum();
    report("original", packets, bytes, drops, at_ready);
}

#[cfg(not(feature = "pcap"))]
fn original(_: &pg_netstat_core::capture::DeviceInfo, _: u16, _: u64) {
    eprintln!("the original-design model needs libpcap: build with --features pcap");
    std::process::exit(1)
}

#[derive(Clone, Copy)]
enum Work {
    Count,
    Parse,
    Account,
}

impl Work {
    fn run(self, acc: &mut Accountant, f: &pg_netstat_core::capture::Frame<'_>, loopback: bool) {
        match self {
            Work::Count => {}
            Work::Parse => {
                let meta = pg_netstat_core::capture::packet::parse(
                    f.data,
                    pg_netstat_core::capture::filter::LinkLayer::Ethernet,
                    f.protocol,
                );
                acc.counted += meta.map_or(0, |m| m.src_port as u64 & 1);
            }
            Work::Account => acc.count(f.data, f.len, f.sec as i64, f.nsec as i64, loopback, f.pkttype),
        }
    }
}

/// The worker's per-frame work (see device/drain.rs): header parsing, the direction
/// rule, interval bucketing and the flow table, in process memory instead of shared; with
/// the worker's shortcut for the next packet of the last connection.
struct Accountant {
    storage: pg_netstat_core::flows::Storage,
    buckets: pg_netstat_core::stats::Bucketing,
    device: [u8; 16],
    port: u16,
    counted: u64,
    last: Option<(
        pg_netstat_core::capture::packet::Ipv4Conn,
        u8,
        pg_netstat_core::capture::Direction,
        pg_netstat_core::flows::FlowKey,
    )>,
}

impl Accountant {
    fn new(port: u16, start_s: i64) -> Self {
        use pg_netstat_core::flows::{device_bytes, Storage};
        let buckets = pg_netstat_core::stats::Bucketing::new(1, 2, start_s);
        let (storage, device) = (Storage::new(1024, 1024), device_bytes("veth0"));
        Accountant { storage, buckets, device, port, counted: 0, last: None }
    }

    fn count(&mut self, data: &[u8], len: u32, sec: i64, nsec: i64, loopback: bool, pkttype: u8) {
        use pg_netstat_core::capture::filter::LinkLayer;
        use pg_netstat_core::capture::{classify, packet};
        use pg_netstat_core::flows::{Clock, FlowKey};
        let ports = [self.port];
        let plain = packet::plain_ipv4(data);
        let (dir, flow) = match (plain, self.last.as_ref()) {
            (Some((conn, tcp)), Some(l)) if l.0 == conn && l.1 == pkttype => (l.2, Some((l.3, Some(tcp)))),
            _ => {
                let meta = packet::parse(data, LinkLayer::Ethernet, 0x0800).ok();
                let Some(dir) = classify(loopback, pkttype, meta.as_ref(), &ports) else { return };
                let flow = meta.map(|m| (FlowKey::of(self.device, dir, &m, &ports), m.tcp));
                if let (Some((conn, _)), Some((key, _))) = (plain, flow) {
                    self.last = Some((conn, pkttype, dir, key));
                }
                (dir, flow)
            }
        };
        self.buckets.record(sec, i64::MAX, dir, len as u64);
        if let Some((key, tcp)) = flow {
            let clock = Clock { ts_us: sec * 1_000_000 + nsec / 1000, interval_secs: 1 };
            let ev = self.storage.table().record(&key, dir, tcp.as_ref(), len, clock);
            if !ev.is_empty() {
                self.buckets.record_tcp(sec, i64::MAX, ev);
            }
        }
        self.counted += 1;
    }

    /// Closes intervals the way the worker's loop does, so open ones never pile up.
    fn tick(&mut self, now_s: i64) {
        let _ = self.buckets.close_due(now_s - 3);
    }
}

fn account(count: u64) {
    let port = 5432u16;
    let mut frames: Vec<Vec<u8>> = PAYLOADS.iter().map(|&p| frame([2, 0, 0, 0, 0, 1], port, p)).collect();
    let start_s = 1_800_000_000i64;
    let mut acc = Accountant::new(port, start_s);
    let mut seq = 1u32;
    let t0 = Instant::now();
    for i in 0..count {
        let n = frames.len();
        let f = &mut frames[i as usize % n];
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        seq = seq.wrapping_add((f.len() - 54) as u32);
        let ts_ns = (start_s as u64) * 1_000_000_000 + i * 10_000;
        let (sec, nsec) = ((ts_ns / 1_000_000_000) as i64, (ts_ns % 1_000_000_000) as i64);
        acc.count(f, f.len() as u32, sec, nsec, false, 0);
        if i % 100_000 == 0 {
            acc.tick(sec);
        }
    }
    let ns = t0.elapsed().as_nanos() as f64 / count.max(1) as f64;
    println!("{{\"frames\": {count}, \"counted\": {}, \"ns_per_frame\": {ns:.1}}}", acc.counted);
}
