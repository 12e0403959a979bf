//! The kernel's per-socket TCP counters (`getsockopt(TCP_INFO)`), read into a
//! `statements::Sample`. No PostgreSQL here: the unit tests read real sockets.
//!
//! The struct is our own mirror of `struct tcp_info` in linux/tcp.h (uapi): glibc's
//! <netinet/tcp.h> copy, and the libc crate's, stop long before `tcpi_bytes_sent`
//! (kernel 4.19). The kernel copies min(our length, its length) bytes and returns the
//! length it wrote, so an older kernel leaves the newer fields out and they read as
//! unavailable, never as zero. Linux only: other systems' TCP_INFO (FreeBSD) or
//! TCP_CONNECTION_INFO (macOS) are other structs, and there `read` returns `None`, so
//! the statement view stays empty.

use crate::statements::Sample;

/// linux/tcp.h `struct tcp_info` up to `tcpi_bytes_sent` and the fields after it that
/// complete its 8-byte alignment.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
    busy_time: u64,
    rwnd_limited: u64,
    sndbuf_limited: u64,
    delivered: u32,
    delivered_ce: u32,
    bytes_sent: u64,
}

// The offsets of linux/tcp.h; a mistake here would silently read the wrong counter.
#[cfg(target_os = "linux")]
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(TcpInfo, rtt) == 68);
    assert!(offset_of!(TcpInfo, total_retrans) == 100);
    assert!(offset_of!(TcpInfo, bytes_received) == 128);
    assert!(offset_of!(TcpInfo, segs_out) == 136);
    assert!(offset_of!(TcpInfo, segs_in) == 140);
    assert!(offset_of!(TcpInfo, bytes_sent) == 200);
    assert!(std::mem::size_of::<TcpInfo>() == 208);
};

/// Whether the field ending at byte `end` of the struct was written by the kernel.
#[cfg(target_os = "linux")]
fn has(len: usize, end: usize) -> bool {
    len >= end
}

/// Whether the peer's FIN is in, by the socket's state (linux/tcp_states.h).
#[cfg(target_os = "linux")]
fn fin_in(state: u8) -> bool {
    const TCP_TIME_WAIT: u8 = 6;
    const TCP_CLOSE_WAIT: u8 = 8;
    const TCP_LAST_ACK: u8 = 9;
    const TCP_CLOSING: u8 = 11;
    matches!(state, TCP_TIME_WAIT | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING)
}

/// `tcpi_bytes_received` counts the peer's FIN as one byte (it advances the sequence
/// number like one); the payload is one less once the FIN is in. A backend reads its
/// socket for the last time when the client has sent Terminate and, often, already
/// closed: CLOSE_WAIT.
#[cfg(target_os = "linux")]
fn payload_received(bytes_received: u64, state: u8) -> u64 {
    bytes_received.saturating_sub(fin_in(state) as u64)
}

/// One reading as the kernel gave it: the counters (`bytes_in` still with the FIN, if
/// it is in) and the state.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Raw {
    sample: Sample,
    state: u8,
}

#[cfg(target_os = "linux")]
impl Raw {
    /// The reading with the FIN taken out of `bytes_in` if its state says it is in.
    fn payload(self) -> Sample {
        Sample { bytes_in: self.sample.bytes_in.map(|b| payload_received(b, self.state)), ..self.sample }
    }
}

/// The counters of TCP socket `fd`; `None` if it is not a TCP socket or the call fails.
/// A FIN that arrives during the call can be in `bytes_in` while the state still says
/// ESTABLISHED (the kernel loads the state before it locks the socket for the counters),
/// so `bytes_in` may be one too many then: `read_final` is exact.
#[cfg(target_os = "linux")]
pub fn read(fd: i32) -> Option<Sample> {
    read_raw(fd).map(Raw::payload)
}

/// `read` for the backend's last reading, when the client's FIN is usually on its way
/// (it closes right after Terminate): a reading whose state does not show the FIN is
/// confirmed by a second one. See `settle`.
#[cfg(target_os = "linux")]
pub fn read_final(fd: i32) -> Option<Sample> {
    let first = read_raw(fd)?;
    if fin_in(first.state) {
        return Some(first.payload());
    }
    Some(match read_raw(fd) {
        Some(second) => settle(first, second),
        None => first.payload(),
    })
}

/// Two readings in a row, the first without the FIN in its state. The kernel loads the
/// state without the socket lock, then the counters under it; the FIN's byte and state
/// change are made together under that lock. So if the first reading's counters hold the
/// FIN, the second's state shows it, and the second reading (FIN taken out) is right;
/// if the second's state does not show it, the FIN was not in when the first read its
/// counters, and the first is right.
#[cfg(target_os = "linux")]
fn settle(first: Raw, second: Raw) -> Sample {
    if fin_in(second.state) {
        second.payload()
    } else {
        first.payload()
    }
}

/// The last reading of a connection whose client has said its last word (Terminate, or
/// its FIN): the server's side is ended first, then the client's answer is awaited, so a
/// client that waits for the server to close (asyncpg) is never kept waiting, and a
/// client slow to close (a busy machine) is still counted to its last byte.
///
/// In order: a reading of the socket as it is; if the connection is already gone (a
/// reset), that reading, nothing more can cross it. Otherwise what waits in the receive
/// queue is read out (the client may have ended already: libpq closes right after its
/// Terminate), `close_session` ends what runs over the socket (PostgreSQL's TLS close
/// sends its close_notify alert), the server's FIN follows (`shutdown(SHUT_WR)`), and
/// unless the client had ended, the wait lasts until its FIN or reset is in, at most
/// `wait`. The final reading's `tcpi_bytes_received` holds the FIN's one sequence byte
/// when the receive queue ended in a FIN (`End`). The socket's state cannot say it here:
/// once the server's FIN has gone, the client's FIN takes the socket through TIME_WAIT
/// to CLOSE at once, the state a reset leaves too.
///
/// A client that has not ended by then: the reading counts what it sent until then; what
/// it sends later crosses the wire uncounted.
#[cfg(target_os = "linux")]
pub fn read_at_end(fd: i32, close_session: impl FnOnce(), wait: std::time::Duration) -> Option<Sample> {
    const TCP_CLOSE: u8 = 7;
    let deadline = std::time::Instant::now() + wait;
    let start = read_raw(fd)?;
    if start.state == TCP_CLOSE {
        let end = end_of_a_reset(fd);
        return Some(without_fin(read_raw(fd)?, end));
    }
    let before = read_out_until(fd, Some(deadline));
    close_session();
    // SAFETY: shutdown(2) on a socket descriptor. It fails (ENOTCONN) only once the
    // connection is gone: a reset came after the first reading.
    let gone = unsafe { libc::shutdown(fd, libc::SHUT_WR) } != 0;
    let end = match before {
        End::Fin | End::Reset => before,
        _ if gone => end_of_a_reset(fd),
        _ => {
            match wait_for_the_peers_end(fd, deadline) {
                End::Open | End::More => {
                    // Still open: a reading, then a second look. If it has not ended by
                    // the second look, it had not at the reading, which then holds no FIN.
                    let reading = read_raw(fd)?;
                    match read_out_until(fd, Some(deadline)) {
                        End::Open => return Some(reading.sample),
                        // Still more than we could read out by the deadline: its state,
                        // the best there is for a client that keeps sending after Terminate.
                        End::More => return Some(reading.payload()),
                        end => end,
                    }
                }
                end => end,
            }
        }
    };
    // Ended: nothing more can arrive, so this reading is final.
    Some(without_fin(read_raw(fd)?, end))
}

/// A final reading's counters, the FIN's sequence byte taken out of `bytes_in` if the
/// receive side ended in one.
#[cfg(target_os = "linux")]
fn without_fin(last: Raw, end: End) -> Sample {
    let fin = (end == End::Fin) as u64;
    Sample { bytes_in: last.sample.bytes_in.map(|b| b.saturating_sub(fin)), ..last.sample }
}

/// How the receive side of a socket stands once what waits in it has been read out.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The peer's FIN is in.
    Fin,
    /// Gone without a FIN (a reset, a timeout).
    Reset,
    /// Neither yet.
    Open,
    /// More data than one call reads out.
    More,
}

/// `End` of a connection that was reset before the server's FIN went (the socket was
/// already closed when it tried), its receive queue read out: did the client's FIN come before the reset? A read
/// returns 0 after the FIN, but also after a reset whose error has already been taken
/// (by PostgreSQL's own read, or by the TLS close's send); the error the reset left says
/// which: EPIPE when it came after the client's FIN (the kernel's choice for a reset in
/// CLOSE_WAIT), ECONNRESET before. Taken already: assumed to be without a FIN, which is
/// wrong by one byte only if a FIN and then a reset both arrived within the few
/// microseconds between the server's last read and its send.
#[cfg(target_os = "linux")]
fn end_of_a_reset(fd: i32) -> End {
    if read_out_until(fd, None) != End::Fin {
        return End::Reset;
    }
    if socket_error(fd) == Some(libc::EPIPE) {
        End::Fin
    } else {
        End::Reset
    }
}

/// The socket's pending error (SO_ERROR, which also clears it).
#[cfg(target_os = "linux")]
fn socket_error(fd: i32) -> Option<i32> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` is a writable c_int and `len` its size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &mut len) };
    (rc == 0 && err != 0).then_some(err)
}

/// Reads out what arrives until the peer's FIN or a reset is in (its `End`), or until
/// `deadline` (`Open`, or `More` while data keeps coming).
#[cfg(target_os = "linux")]
fn wait_for_the_peers_end(fd: i32, deadline: std::time::Instant) -> End {
    loop {
        let end = read_out(fd);
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if matches!(end, End::Fin | End::Reset) || left.is_zero() {
            return end;
        }
        if end == End::More {
            continue;
        }
        let mut p = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call. Whatever it returns (data,
        // the end, a signal, the time up), the queue is read out again above.
        unsafe { libc::poll(&mut p, 1, left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32) };
    }
}

/// `read_out` until the receive side says how it stands, or (with a deadline, while data
/// keeps coming) until the deadline has passed. Without one, only for a connection that
/// is gone: what waits in it is all there will be.
#[cfg(target_os = "linux")]
fn read_out_until(fd: i32, deadline: Option<std::time::Instant>) -> End {
    loop {
        let end = read_out(fd);
        if end != End::More || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return end;
        }
    }
}

/// Reads out and discards what waits in the socket (nobody reads it any more), up to
/// 1 MiB a call, and says how the receive side ends. A read returns 0 when the peer's FIN
/// is in (the kernel checks for it before any pending error) and an error after a reset
/// without one, reported once (see `end_of_a_reset`).
#[cfg(target_os = "linux")]
fn read_out(fd: i32) -> End {
    let mut buf = [0u8; 16384];
    for _ in 0..64 {
        // SAFETY: `buf` is writable for its length; MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return End::Fin;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return End::Open,
            _ => return End::Reset,
        }
    }
    End::More
}

#[cfg(target_os = "linux")]
fn read_raw(fd: i32) -> Option<Raw> {
    use std::mem::{offset_of, size_of};
    let mut info = TcpInfo::default();
    let mut len = size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; the kernel writes at most that
    // many and stores the count in `len`.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    let len = len as usize;
    let end = |off: usize, size: usize| has(len, off + size);
    let sample = Sample {
        bytes_in: end(offset_of!(TcpInfo, bytes_received), 8).then_some(info.bytes_received),
        bytes_out: end(offset_of!(TcpInfo, bytes_sent), 8).then_some(info.bytes_sent),
        segs_in: end(offset_of!(TcpInfo, segs_in), 4).then_some(info.segs_in),
        segs_out: end(offset_of!(TcpInfo, segs_out), 4).then_some(info.segs_out),
        retrans: end(offset_of!(TcpInfo, total_retrans), 4).then_some(info.total_retrans),
        rtt_us: end(offset_of!(TcpInfo, rtt), 4).then_some(info.rtt),
    };
    Some(Raw { sample, state: info.state })
}

#[cfg(not(target_os = "linux"))]
pub fn read(_fd: i32) -> Option<Sample> {
    None
}

#[cfg(not(target_os = "linux"))]
pub fn read_final(_fd: i32) -> Option<Sample> {
    None
}

#[cfg(not(target_os = "linux"))]
pub fn read_at_end(_fd: i32, _close_session: impl FnOnce(), _wait: std::time::Duration) -> Option<Sample> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn counts_what_crossed_a_real_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let before = read(server.as_raw_fd()).unwrap();
        assert_eq!((before.bytes_in, before.bytes_out), (Some(0), Some(0)));
        client.write_all(&[7u8; 100_000]).unwrap();
        let mut buf = vec![0u8; 100_000];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"hello").unwrap();
        client.read_exact(&mut buf[..5]).unwrap();
        let s = read(server.as_raw_fd()).unwrap();
        assert_eq!((s.bytes_in, s.bytes_out), (Some(100_000), Some(5)));
        assert!(s.segs_in.unwrap() >= 2 && s.segs_out.unwrap() >= 1, "{s:?}");
        assert_eq!(s.retrans, Some(0));
        assert!(s.rtt_us.unwrap() > 0);
        let c = read(client.as_raw_fd()).unwrap();
        assert_eq!((c.bytes_in, c.bytes_out), (Some(5), Some(100_000)));
    }

    #[test]
    fn the_peers_fin_is_not_payload() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        client.write_all(b"Terminate").unwrap();
        drop(client);
        let mut buf = Vec::new();
        server.read_to_end(&mut buf).unwrap(); // returns once the FIN is in
        assert_eq!(read(server.as_raw_fd()).unwrap().bytes_in, Some(9));
        assert_eq!(payload_received(10, 1), 10); // ESTABLISHED
    }

    #[test]
    fn a_fin_arriving_during_a_reading_is_settled_by_the_next() {
        const ESTABLISHED: u8 = 1;
        const CLOSE_WAIT: u8 = 8;
        let raw = |bytes_in, state| Raw { sample: Sample { bytes_in: Some(bytes_in), ..Sample::default() }, state };
        // The FIN came in between the first reading's state and its counters: its
        // counters hold the FIN's byte under ESTABLISHED; the second shows CLOSE_WAIT.
        assert_eq!(raw(101, ESTABLISHED).payload().bytes_in, Some(101)); // what `read` gives: one too many
        assert_eq!(settle(raw(101, ESTABLISHED), raw(101, CLOSE_WAIT)).bytes_in, Some(100));
        // The FIN came after the first reading: the same answer.
        assert_eq!(settle(raw(100, ESTABLISHED), raw(101, CLOSE_WAIT)).bytes_in, Some(100));
        // No FIN yet, or during the second reading only: the first is right.
        assert_eq!(settle(raw(100, ESTABLISHED), raw(100, ESTABLISHED)).bytes_in, Some(100));
        assert_eq!(settle(raw(100, ESTABLISHED), raw(101, ESTABLISHED)).bytes_in, Some(100));
    }

    #[test]
    fn read_final_on_a_real_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        client.write_all(b"Terminate").unwrap();
        let mut buf = [0u8; 9];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(read_final(server.as_raw_fd()).unwrap().bytes_in, Some(9));
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        assert_eq!(read_final(server.as_raw_fd()).unwrap().bytes_in, Some(9));
    }

    /// A connected pair on 127.0.0.1: (client, server).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (client, server)
    }

    /// The server's end of a session after the client's Terminate (9 bytes, read), as
    /// the backend's exit does it: its own close message (`alert`, 24 bytes, written by
    /// `close_session`), its FIN, the wait, the reading.
    fn end_after_terminate(server: &mut TcpStream, wait: Duration) -> (Sample, Duration) {
        let mut terminate = [0u8; 9];
        server.read_exact(&mut terminate).unwrap();
        let t = Instant::now();
        let mut s2 = server.try_clone().unwrap();
        let got = read_at_end(server.as_raw_fd(), move || drop(s2.write_all(&[0x15; 24])), wait).unwrap();
        (got, t.elapsed())
    }

    use std::time::{Duration, Instant};
    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn a_client_that_waits_for_the_server_to_close_is_answered_at_once_and_counted_whole() {
        // asyncpg: Terminate, then it waits for the server's close; under TLS it answers
        // the server's close_notify with its own (24 bytes), then closes.
        let (mut client, mut server) = pair();
        let c = std::thread::spawn(move || {
            client.write_all(b"Terminate").unwrap();
            let mut from_server = Vec::new();
            client.read_to_end(&mut from_server).unwrap(); // until the server's FIN
            client.write_all(&[0x15; 24]).unwrap();
            from_server.len()
        });
        let (got, took) = end_after_terminate(&mut server, LONG);
        assert_eq!(c.join().unwrap(), 24);
        assert_eq!((got.bytes_in, got.bytes_out), (Some(9 + 24), Some(24)));
        assert!(took < LONG / 2, "waited {took:?} for a client that waited for us");
    }

    #[test]
    fn a_client_slow_to_close_is_counted_to_its_last_byte() {
        // A busy machine: the client's last record and FIN come 300 ms after Terminate.
        let (mut client, mut server) = pair();
        let c = std::thread::spawn(move || {
            client.write_all(b"Terminate").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            client.write_all(&[0x15; 24]).unwrap();
        });
        let (got, _) = end_after_terminate(&mut server, LONG);
        c.join().unwrap();
        assert_eq!((got.bytes_in, got.bytes_out), (Some(9 + 24), Some(24)));
    }

    #[test]
    fn a_client_that_closed_first_and_resets_the_servers_alert_is_counted_without_its_fin() {
        // libpq: Terminate, its close_notify and its FIN at once; the server's alert then
        // reaches a closed socket, which answers with a reset. The FIN came before.
        let (mut client, mut server) = pair();
        client.write_all(b"Terminate").unwrap();
        client.write_all(&[0x15; 24]).unwrap();
        drop(client);
        let mut p = libc::pollfd { fd: server.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 10_000) }, 1); // the FIN is in
        let (got, _) = end_after_terminate(&mut server, LONG);
        assert_eq!((got.bytes_in, got.bytes_out), (Some(9 + 24), Some(24)));
    }

    #[test]
    fn a_reset_without_a_fin_keeps_every_byte_received() {
        // The client leaves the server's alert unread and closes: its kernel sends a
        // reset, no FIN. Every byte it sent is payload.
        let (mut client, mut server) = pair();
        let c = std::thread::spawn(move || {
            client.write_all(b"Terminate").unwrap();
            client.write_all(&[0x15; 24]).unwrap();
            let mut one = [0u8; 1];
            client.read_exact(&mut one).unwrap(); // the alert has arrived, unread but 1 byte
            drop(client); // unread data: a reset
        });
        let (got, _) = end_after_terminate(&mut server, LONG);
        c.join().unwrap();
        assert_eq!((got.bytes_in, got.bytes_out), (Some(9 + 24), Some(24)));
    }

    #[test]
    fn a_client_that_never_closes_costs_the_bound_and_what_it_sent_is_counted() {
        let (mut client, mut server) = pair();
        client.write_all(b"Terminate").unwrap();
        client.write_all(&[1; 5]).unwrap();
        let (got, took) = end_after_terminate(&mut server, Duration::from_millis(100));
        assert_eq!((got.bytes_in, got.bytes_out), (Some(9 + 5), Some(24)));
        assert!(took >= Duration::from_millis(100), "{took:?}");
        drop(client);
    }

    #[test]
    fn a_connection_already_reset_is_read_as_it_is_and_not_closed_again() {
        let (client, mut server) = pair();
        (&client).write_all(b"Terminate").unwrap();
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client); // a reset, no FIN
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).unwrap(), 9);
        assert!(server.read(&mut buf).is_err()); // the server has taken the error
        let mut closed = false;
        let got = read_at_end(server.as_raw_fd(), || closed = true, LONG).unwrap();
        assert!(!closed);
        assert_eq!((got.bytes_in, got.bytes_out), (Some(9), Some(0)));
    }

    /// Waits until the socket's connection is gone (a reset is in: POLLHUP).
    fn until_reset(fd: i32) {
        let mut p = libc::pollfd { fd, events: 0, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 10_000) }, 1);
        assert!(p.revents & libc::POLLHUP != 0, "{:#x}", p.revents);
    }

    #[test]
    fn a_fin_then_a_reset_before_the_exit_is_counted_without_the_fin() {
        // The client sends Terminate and closes; something the server sends after that
        // (a notification) is answered with a reset: CLOSE_WAIT, then CLOSE, before the
        // exit reads the socket. Its state no longer shows the FIN.
        let (mut client, mut server) = pair();
        client.write_all(b"Terminate").unwrap();
        drop(client);
        let mut terminate = [0u8; 9];
        server.read_exact(&mut terminate).unwrap();
        let mut p = libc::pollfd { fd: server.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 10_000) }, 1); // the FIN is in
        server.write_all(b"NOTIFY").unwrap();
        until_reset(server.as_raw_fd());
        let mut closed = false;
        let got = read_at_end(server.as_raw_fd(), || closed = true, LONG).unwrap();
        assert!(!closed);
        assert_eq!((got.bytes_in, got.bytes_out), (Some(9), Some(6)));
    }

    #[test]
    fn a_reset_taken_by_the_servers_own_close_message_is_not_a_fin() {
        // The client resets (no FIN) after the first reading; the server's close
        // message then fails and takes the error, and the socket is gone before its FIN.
        let (mut client, mut server) = pair();
        client.write_all(b"Terminate").unwrap();
        let mut terminate = [0u8; 9];
        server.read_exact(&mut terminate).unwrap();
        let fd = server.as_raw_fd();
        let got = read_at_end(
            fd,
            || {
                socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
                drop(client);
                until_reset(fd);
                assert!(server.write_all(&[0x15; 24]).is_err()); // takes the error
            },
            LONG,
        )
        .unwrap();
        assert_eq!(got.bytes_in, Some(9));
    }

    #[test]
    fn more_than_one_read_out_before_the_fin_is_counted_whole() {
        const BIG: usize = 3 << 20;
        let (mut client, mut server) = pair();
        let c = std::thread::spawn(move || {
            client.write_all(b"Terminate").unwrap();
            client.write_all(&vec![1u8; BIG]).unwrap();
            // Closed with nothing unread (the server sends no close message here): a FIN.
        });
        let mut terminate = [0u8; 9];
        server.read_exact(&mut terminate).unwrap();
        let got = read_at_end(server.as_raw_fd(), || (), LONG).unwrap();
        c.join().unwrap();
        assert_eq!(got.bytes_in, Some((9 + BIG) as u64));
    }

    #[test]
    fn a_short_struct_leaves_the_newer_fields_unavailable() {
        assert!(has(208, 208));
        assert!(!has(200, 208));
    }

    #[test]
    fn not_a_tcp_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(read(a.as_raw_fd()), None);
    }
}
