//! Header parsing: from a captured (possibly snaplen-truncated) frame to the few facts
//! counting needs. Only headers are read; payload bytes are never looked at or kept.

use super::field::{ethernet, ethertype, ipv4, ipv6, tcp};
use super::filter::LinkLayer;

/// What one captured frame says about its TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketMeta {
    pub src_port: u16,
    pub dst_port: u16,
    pub ipv6: bool,
    /// Addresses; an IPv4 address fills the first 4 bytes, the rest stay zero.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// The rest of the TCP header's fixed part, when the capture reaches that far.
    pub tcp: Option<TcpFields>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpFields {
    pub seq: u32,
    pub flags: u8,
    pub window: u16,
    /// TCP header length (data offset × 4).
    pub header_len: u32,
    /// Where the TCP header starts in the frame.
    pub offset: u32,
    /// TCP header + payload as the IP header states it; `None` when the IP length field
    /// is 0 (a GSO/GRO super-packet over 64 KiB, "BIG TCP") and only the frame's length
    /// on the wire tells.
    pub segment_len: Option<u32>,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl TcpFields {
    /// Payload bytes of the segment. The IP header's length is preferred over the
    /// frame's: Ethernet pads short frames, and padding is not payload.
    pub fn payload_len(&self, wire_len: u32) -> u32 {
        match self.segment_len {
            Some(seg) => seg.saturating_sub(self.header_len),
            None => wire_len.saturating_sub(self.offset).saturating_sub(self.header_len),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a link header, or a link type we do not parse.
    Link,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// IP, but the transport is not TCP (or hides behind headers we do not walk).
    NotTcp,
    /// An IPv4/IPv6 fragment after the first: it carries no ports.
    LaterFragment,
    /// The capture ends before the TCP ports.
    Truncated,
}

/// Parses `frame` as the ring delivers it. `protocol` is the skb protocol from the ring
/// metadata, needed when the frame has no link header (`LinkLayer::Cooked`).
///
/// Written out by hand for the few layouts the kernel filter lets through: Ethernet with
/// up to two 802.1Q/802.1ad tags, IPv4, IPv6 with TCP directly or behind one fragment
/// header. It runs for every packet when connections are tracked; the general-purpose
/// parser it replaced cost three times as much (docs/performance.md), and is now the
/// reference it is checked against in the tests below.
// One function on purpose (about 90 lines): straight-line code on the per-packet path,
// in the order the headers come, with no call that could stay out of line.
pub fn parse(frame: &[u8], link: LinkLayer, protocol: u16) -> Result<PacketMeta, ParseError> {
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let (mut ethertype, mut off) = match link {
        LinkLayer::Ethernet => {
            if frame.len() < ethernet::HEADER_LEN {
                return Err(ParseError::Link);
            }
            (be16(ethernet::ETHERTYPE), ethernet::HEADER_LEN)
        }
        LinkLayer::Cooked => (protocol, 0),
    };
    for _ in 0..2 {
        if !matches!(ethertype, ethertype::VLAN | ethertype::QINQ | ethertype::QINQ_OLD) {
            break;
        }
        if frame.len() < off + ethernet::TAG_LEN {
            return Err(ParseError::Truncated);
        }
        ethertype = be16(off + ethernet::TAG_LEN - 2);
        off += ethernet::TAG_LEN;
    }
    let mut m = PacketMeta::default();
    let (tcp_start, ip_end) = match ethertype {
        ethertype::IPV4 => {
            if frame.len() < off + ipv4::MIN_HEADER_LEN {
                return Err(ParseError::Truncated);
            }
            let ihl = (frame[off + ipv4::VER_IHL] & 0x0f) as usize * 4;
            if frame[off + ipv4::VER_IHL] >> 4 != 4 || ihl < ipv4::MIN_HEADER_LEN {
                return Err(ParseError::NotIp);
            }
            if frame.len() < off + ihl {
                return Err(ParseError::Truncated);
            }
            if frame[off + ipv4::PROTOCOL] != tcp::PROTOCOL {
                return Err(ParseError::NotTcp);
            }
            if be16(off + ipv4::FLAGS_FRAG) & ipv4::FRAG_OFFSET_MASK != 0 {
                return Err(ParseError::LaterFragment);
            }
            m.src_addr[..4].copy_from_slice(&frame[off + ipv4::SRC..off + ipv4::SRC + 4]);
            m.dst_addr[..4].copy_from_slice(&frame[off + ipv4::DST..off + ipv4::DST + 4]);
            let total = be16(off + ipv4::TOTAL_LEN) as usize;
            (off + ihl, if total == 0 { 0 } else { off + total })
        }
        ethertype::IPV6 => {
            if frame.len() < off + ipv6::HEADER_LEN {
                return Err(ParseError::Truncated);
            }
            if frame[off] >> 4 != 6 {
                return Err(ParseError::NotIp);
            }
            m.ipv6 = true;
            m.src_addr.copy_from_slice(&frame[off + ipv6::SRC..off + ipv6::SRC + 16]);
            m.dst_addr.copy_from_slice(&frame[off + ipv6::DST..off + ipv6::DST + 16]);
            let plen = be16(off + ipv6::PAYLOAD_LEN) as usize;
            let ip_end = if plen == 0 { 0 } else { off + ipv6::HEADER_LEN + plen };
            let (mut next, mut start) = (frame[off + ipv6::NEXT_HEADER], off + ipv6::HEADER_LEN);
            if next == ipv6::FRAGMENT {
                // Fragment header: the TCP header is only in the first fragment.
                if frame.len() < start + ipv6::FRAGMENT_HEADER_LEN {
                    return Err(ParseError::Truncated);
                }
                if be16(start + ipv6::FRAGMENT_OFFSET) & ipv6::FRAGMENT_OFFSET_MASK != 0 {
                    return Err(ParseError::LaterFragment);
                }
                next = frame[start];
                start += ipv6::FRAGMENT_HEADER_LEN;
            }
            if next != tcp::PROTOCOL {
                return Err(ParseError::NotTcp);
            }
            (start, ip_end)
        }
        _ => return Err(ParseError::NotIp),
    };
    // Ports are read where the transport header starts in the captured bytes, whatever
    // the IP length fields claim: that is what the kernel filter (and tcpdump) reads.
    let p = frame.get(tcp_start..tcp_start + 4).ok_or(ParseError::Truncated)?;
    let (sp, dp) = (tcp::SRC_PORT, tcp::DST_PORT);
    m.src_port = u16::from_be_bytes([p[sp], p[sp + 1]]);
    m.dst_port = u16::from_be_bytes([p[dp], p[dp + 1]]);
    m.tcp = frame.get(tcp_start..tcp_start + tcp::FIELDS_LEN).map(|t| TcpFields {
        seq: u32::from_be_bytes([t[tcp::SEQ], t[tcp::SEQ + 1], t[tcp::SEQ + 2], t[tcp::SEQ + 3]]),
        flags: t[tcp::FLAGS],
        window: u16::from_be_bytes([t[tcp::WINDOW], t[tcp::WINDOW + 1]]),
        header_len: ((t[tcp::DATA_OFFSET] >> 4) as u32) * 4,
        offset: tcp_start as u32,
        segment_len: (ip_end > tcp_start).then(|| (ip_end - tcp_start) as u32),
    });
    Ok(m)
}

/// What identifies a plain IPv4 TCP packet's connection: its addresses and ports, the
/// 12 bytes as the frame holds them (source, destination, source port, destination port).
pub type Ipv4Conn = [u8; 12];

/// The commonest layout, read at fixed offsets: Ethernet with no in-band tag, IPv4 with no
/// options, TCP, not a later fragment, captured at least through the TCP fields. For such
/// a frame: its connection's bytes and its TCP fields, exactly as `parse` reports them
/// (tested below); `None` for every other frame, which `parse` then handles.
///
/// The worker's same-flow shortcut (device/drain.rs) compares the connection bytes with the
/// previous packet's and, when they match, reuses that packet's flow key: a bulk transfer
/// then skips the general parse, the copies of its result and the building of the key.
#[inline]
pub fn plain_ipv4(frame: &[u8]) -> Option<(Ipv4Conn, TcpFields)> {
    const IP: usize = ethernet::HEADER_LEN;
    const TCP: usize = IP + ipv4::MIN_HEADER_LEN;
    // One bounds check for every read below.
    let h: &[u8; TCP + tcp::FIELDS_LEN] = frame.get(..TCP + tcp::FIELDS_LEN)?.try_into().ok()?;
    let be16 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
    if be16(ethernet::ETHERTYPE) != ethertype::IPV4
        || h[IP + ipv4::VER_IHL] != 0x45
        || h[IP + ipv4::PROTOCOL] != tcp::PROTOCOL
        || be16(IP + ipv4::FLAGS_FRAG) & ipv4::FRAG_OFFSET_MASK != 0
    {
        return None;
    }
    let mut conn = [0u8; 12];
    conn[..8].copy_from_slice(&h[IP + ipv4::SRC..IP + ipv4::DST + 4]);
    conn[8..].copy_from_slice(&h[TCP..TCP + 4]);
    let total = be16(IP + ipv4::TOTAL_LEN) as usize;
    let t = &h[TCP..];
    Some((
        conn,
        TcpFields {
            seq: u32::from_be_bytes([t[tcp::SEQ], t[tcp::SEQ + 1], t[tcp::SEQ + 2], t[tcp::SEQ + 3]]),
            flags: t[tcp::FLAGS],
            window: u16::from_be_bytes([t[tcp::WINDOW], t[tcp::WINDOW + 1]]),
            header_len: ((t[tcp::DATA_OFFSET] >> 4) as u32) * 4,
            offset: TCP as u32,
            // As `parse`: the IP header's end, when it says where that is and it lies past
            // the TCP header's start.
            segment_len: (total > ipv4::MIN_HEADER_LEN).then(|| (total - ipv4::MIN_HEADER_LEN) as u32),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::testframes::*;

    const ETH: LinkLayer = LinkLayer::Ethernet;

    /// A SYN from 127.0.0.1:51234 to 127.0.0.1:5432 as tcpdump -xx printed it on `lo`
    /// (TCP options included; checksum as captured on this project's dev machine).
    const LO_SYN: [u8; 74] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x45, 0x00, 0x00, 0x3c,
        0x2a, 0xcf, 0x40, 0x00, 0x40, 0x06, 0x11, 0xeb, 0x7f, 0x00, 0x00, 0x01, 0x7f, 0x00, 0x00, 0x01, 0xc8, 0x22,
        0x15, 0x38, 0x4a, 0xcd, 0x7c, 0x9c, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xff, 0xd7, 0xfe, 0x30, 0x00, 0x00,
        0x02, 0x04, 0xff, 0xd7, 0x04, 0x02, 0x08, 0x0a, 0x34, 0x75, 0xf3, 0x4e, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03,
        0x03, 0x0a,
    ];

    #[test]
    fn literal_loopback_syn() {
        let m = parse(&LO_SYN, ETH, 0).unwrap();
        assert_eq!((m.src_port, m.dst_port, m.ipv6), (51234, 5432, false));
        assert_eq!((&m.src_addr[..4], &m.dst_addr[..4]), (&[127, 0, 0, 1][..], &[127, 0, 0, 1][..]));
        let t = m.tcp.unwrap();
        assert_eq!((t.seq, t.flags, t.window, t.header_len, t.offset), (0x4acd7c9c, 0x02, 0xffd7, 40, 34));
        assert_eq!((t.segment_len, t.payload_len(74)), (Some(40), 0));
    }

    #[test]
    fn payload_from_the_ip_length_not_the_padded_frame() {
        let mut f = eth_ipv4_tcp(40000, 5432, 0);
        f.resize(60, 0); // Ethernet minimum: 6 bytes of padding after the TCP header
        let t = parse(&f, ETH, 0).unwrap().tcp.unwrap();
        assert_eq!(t.payload_len(60), 0);
        // BIG TCP over IPv6: payload length 0, the wire length tells.
        let mut v6 = eth_ipv6_tcp(40000, 5432);
        v6[18] = 0;
        v6[19] = 0;
        let t = parse(&v6, ETH, 0).unwrap().tcp.unwrap();
        assert_eq!((t.segment_len, t.payload_len(14 + 40 + 20 + 100_000)), (None, 100_000));
        let m = parse(&v6, ETH, 0).unwrap();
        assert!(m.ipv6 && m.src_addr[15] == 1 && m.dst_addr[15] == 1);
    }

    #[test]
    fn truncated_at_96_still_gives_ports() {
        // A full-size segment cut by snaplen: IP total length says 1500, we have 96 bytes.
        let mut f = LO_SYN.to_vec();
        f[16..18].copy_from_slice(&1500u16.to_be_bytes());
        f.resize(96, 0xee);
        assert_eq!(parse(&f, ETH, 0).unwrap().dst_port, 5432);
    }

    #[test]
    fn ipv4_with_options_and_ipv6() {
        assert_eq!(parse(&eth_ipv4_tcp(5432, 40001, 40), ETH, 0).unwrap().src_port, 5432);
        let m = parse(&eth_ipv6_tcp(40002, 5432), ETH, 0).unwrap();
        assert_eq!((m.src_port, m.dst_port, m.ipv6), (40002, 5432, true));
    }

    #[test]
    fn in_band_vlan() {
        let f = vlan_tagged(&eth_ipv4_tcp(40003, 5432, 0), 42);
        assert_eq!(parse(&f, ETH, 0).unwrap().src_port, 40003);
    }

    #[test]
    fn cooked_frames_use_the_given_protocol() {
        let f = eth_ipv6_tcp(5432, 40004);
        assert_eq!(parse(&f[14..], LinkLayer::Cooked, 0x86dd).unwrap().dst_port, 40004);
        assert_eq!(parse(&f[14..], LinkLayer::Cooked, 0x0806), Err(ParseError::NotIp));
    }

    #[test]
    fn later_fragment_has_no_ports() {
        let mut f = eth_ipv4_tcp(40000, 5432, 0);
        f[14 + 7] = 0x10;
        assert_eq!(parse(&f, ETH, 0), Err(ParseError::LaterFragment));
        let mut first = eth_ipv4_tcp(40000, 5432, 0);
        first[14 + 6] = 0x20; // MF, offset 0
        assert_eq!(parse(&first, ETH, 0).unwrap().dst_port, 5432);
    }

    #[test]
    fn non_tcp_and_non_ip() {
        assert_eq!(parse(&eth_ipv4_udp(1, 5432), ETH, 0), Err(ParseError::NotTcp));
        let mut arp = eth_ipv4_tcp(1, 2, 0);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp, ETH, 0), Err(ParseError::NotIp));
    }

    #[test]
    fn every_prefix_of_a_frame_is_handled() {
        for frame in [LO_SYN.to_vec(), eth_ipv6_tcp(1, 2), vlan_tagged(&eth_ipv4_tcp(3, 4, 8), 1)] {
            let full = parse(&frame, ETH, 0).unwrap();
            for n in 0..frame.len() {
                match parse(&frame[..n], ETH, 0) {
                    // Cut inside the TCP header: ports and addresses still right, and
                    // the rest of the header only once it is all there.
                    Ok(m) => {
                        assert_eq!(PacketMeta { tcp: None, ..m }, PacketMeta { tcp: None, ..full }, "prefix {n}");
                        assert!(m.tcp.is_none() || m.tcp == full.tcp, "prefix {n}: {m:?}");
                    }
                    Err(e) => assert!(
                        matches!(e, ParseError::Link | ParseError::Truncated | ParseError::NotIp),
                        "prefix {n}: {e:?}"
                    ),
                }
            }
        }
    }

    /// The reference: etherparse's lax slicing, reduced to what `parse` reports.
    type Oracle = (u16, u16, bool, [u8; 16], [u8; 16]);

    fn oracle(frame: &[u8]) -> Option<Oracle> {
        use etherparse::{IpNumber, LaxNetSlice, LaxSlicedPacket};
        let sliced = LaxSlicedPacket::from_ethernet(frame).ok()?;
        let (payload, ipv6, src, dst) = match &sliced.net {
            Some(LaxNetSlice::Ipv4(v4)) => {
                let h = v4.header();
                if h.fragments_offset().value() != 0 {
                    return None;
                }
                let (mut s, mut d) = ([0u8; 16], [0u8; 16]);
                s[..4].copy_from_slice(&h.source());
                d[..4].copy_from_slice(&h.destination());
                (v4.payload(), false, s, d)
            }
            Some(LaxNetSlice::Ipv6(v6)) => (v6.payload(), true, v6.header().source(), v6.header().destination()),
            None => return None,
        };
        if payload.ip_number != IpNumber::TCP || payload.fragmented {
            return None;
        }
        let start = (payload.payload.as_ptr() as usize).wrapping_sub(frame.as_ptr() as usize);
        let p = frame.get(start..start + 4)?;
        Some((u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]), ipv6, src, dst))
    }

    #[test]
    fn agrees_with_etherparse_on_valid_and_mutated_frames() {
        let mut next = crate::capture::testframes::xorshift(0x5eed);
        let bases = [
            LO_SYN.to_vec(),
            eth_ipv6_tcp(40000, 5432),
            eth_ipv4_tcp(5432, 40001, 12),
            vlan_tagged(&eth_ipv4_tcp(1, 2, 0), 7),
            vlan_tagged(&eth_ipv6_tcp(3, 4), 8),
        ];
        let mut checked = 0;
        for _ in 0..20_000 {
            let mut f = bases[next() as usize % bases.len()].clone();
            // Flip a few bytes among the headers (not the MACs, which change nothing).
            for _ in 0..(next() % 3) {
                let i = 12 + next() as usize % (f.len() - 12).min(60);
                f[i] = next() as u8;
            }
            let want = oracle(&f);
            let got = parse(&f, ETH, 0).ok().map(|m| (m.src_port, m.dst_port, m.ipv6, m.src_addr, m.dst_addr));
            // etherparse walks IPv6 extension headers the kernel filter never passes;
            // where the next header is TCP (the only case we see) both must agree.
            let v6_ext = f.len() > 20 && f[12..14] == [0x86, 0xdd] && f[20] != 6;
            if !v6_ext && want.is_some() {
                assert_eq!(got, want, "{f:02x?}");
                checked += 1;
            }
        }
        assert!(checked > 5_000, "only {checked} frames compared");
    }

    #[test]
    fn the_plain_ipv4_shortcut_agrees_with_parse() {
        // Every frame the shortcut accepts, whole, cut short or with header bytes
        // changed, must give what `parse` gives; and it must accept the common frames.
        let mut next = xorshift(0x51a7);
        let bases = [
            LO_SYN.to_vec(),
            eth_ipv4_tcp(40000, 5432, 0),
            eth_ipv4_tcp(5432, 40001, 8),
            eth_ipv6_tcp(40002, 5432),
            vlan_tagged(&eth_ipv4_tcp(1, 2, 0), 7),
        ];
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..40_000 {
            let mut f = bases[round % bases.len()].clone();
            for _ in 0..(next() % 3) {
                let i = 12 + next() as usize % (f.len() - 12).min(50);
                f[i] = match next() % 4 {
                    0 => 0x45,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            if next().is_multiple_of(4) {
                f.truncate(next() as usize % (f.len() + 1));
            }
            match plain_ipv4(&f) {
                Some((conn, tcp)) => {
                    let m = parse(&f, ETH, 0).expect("the shortcut took a frame parse refuses");
                    assert_eq!(m.tcp, Some(tcp), "{f:02x?}");
                    assert_eq!((m.ipv6, &m.src_addr[4..], &m.dst_addr[4..]), (false, &[0u8; 12][..], &[0u8; 12][..]));
                    assert_eq!(conn[..4], m.src_addr[..4]);
                    assert_eq!(conn[4..8], m.dst_addr[..4]);
                    assert_eq!(
                        (u16::from_be_bytes([conn[8], conn[9]]), u16::from_be_bytes([conn[10], conn[11]])),
                        (m.src_port, m.dst_port)
                    );
                    accepted += 1;
                }
                None => refused += 1,
            }
        }
        assert!(accepted > 5_000 && refused > 5_000, "accepted {accepted}, refused {refused}");
        assert!(plain_ipv4(&LO_SYN).is_some() && plain_ipv4(&eth_ipv4_tcp(1, 2, 0)).is_some());
        assert!(plain_ipv4(&eth_ipv4_tcp(1, 2, 4)).is_none(), "IP options: parse's job");
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut next = xorshift(0x9e37_79b9);
        let bases = [LO_SYN.to_vec(), eth_ipv6_tcp(1, 2), vlan_tagged(&eth_ipv4_tcp(3, 4, 40), 5)];
        for round in 0..20_000 {
            let mut f = bases[round % bases.len()].clone();
            for _ in 0..(next() % 6) {
                let i = next() as usize % f.len();
                f[i] = next() as u8;
            }
            f.truncate(next() as usize % (f.len() + 1));
            let _ = parse(&f, ETH, 0);
            let _ = parse(&f, LinkLayer::Cooked, next() as u16);
        }
    }
}
