//! Header parsing: from a captured (possibly snaplen-truncated) frame to the few facts
//! counting needs. Only headers are read; payload bytes are never looked at or kept.

use super::filter::LinkLayer;
use etherparse::{EtherType, IpNumber, LaxNetSlice, LaxSlicedPacket};

/// What one captured frame says about its TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    pub src_port: u16,
    pub dst_port: u16,
    pub ipv6: bool,
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
pub fn parse(frame: &[u8], link: LinkLayer, protocol: u16) -> Result<PacketMeta, ParseError> {
    let sliced = match link {
        LinkLayer::Ethernet => LaxSlicedPacket::from_ethernet(frame).map_err(|_| ParseError::Link)?,
        LinkLayer::Cooked => LaxSlicedPacket::from_ether_type(EtherType(protocol), frame),
    };
    let (payload, later_fragment, ipv6) = match &sliced.net {
        Some(LaxNetSlice::Ipv4(v4)) => {
            let later = v4.header().fragments_offset().value() != 0;
            (v4.payload(), later, false)
        }
        Some(LaxNetSlice::Ipv6(v6)) => {
            // etherparse walks the extension headers; a fragment header with a non-zero
            // offset means the TCP header is in an earlier fragment.
            let later = v6.payload().fragmented && !v6_first_fragment(v6);
            (v6.payload(), later, true)
        }
        None => {
            return Err(if sliced.stop_err.is_some() { ParseError::Truncated } else { ParseError::NotIp })
        }
    };
    if payload.ip_number != IpNumber::TCP {
        return Err(ParseError::NotTcp);
    }
    if later_fragment {
        return Err(ParseError::LaterFragment);
    }
    // Ports are read where the transport header starts in the captured bytes, whatever
    // the IP length fields claim: that is what the kernel filter (and tcpdump) reads, and
    // the payload etherparse hands back is cut by those fields.
    let start = (payload.payload.as_ptr() as usize).wrapping_sub(frame.as_ptr() as usize);
    let p = frame.get(start..start.saturating_add(4)).ok_or(ParseError::Truncated)?;
    Ok(PacketMeta {
        src_port: u16::from_be_bytes([p[0], p[1]]),
        dst_port: u16::from_be_bytes([p[2], p[3]]),
        ipv6,
    })
}

fn v6_first_fragment(v6: &etherparse::LaxIpv6Slice<'_>) -> bool {
    use etherparse::Ipv6ExtensionSlice;
    v6.extensions().clone().into_iter().all(|ext| match ext {
        Ipv6ExtensionSlice::Fragment(frag) => frag.fragment_offset().value() == 0,
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::testframes::*;

    const ETH: LinkLayer = LinkLayer::Ethernet;

    /// A SYN from 127.0.0.1:51234 to 127.0.0.1:5432 as tcpdump -xx printed it on `lo`
    /// (TCP options included; checksum as captured on this project's dev machine).
    const LO_SYN: [u8; 74] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00,
        0x45, 0x00, 0x00, 0x3c, 0x2a, 0xcf, 0x40, 0x00, 0x40, 0x06, 0x11, 0xeb, 0x7f, 0x00,
        0x00, 0x01, 0x7f, 0x00, 0x00, 0x01, 0xc8, 0x22, 0x15, 0x38, 0x4a, 0xcd, 0x7c, 0x9c,
        0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xff, 0xd7, 0xfe, 0x30, 0x00, 0x00, 0x02, 0x04,
        0xff, 0xd7, 0x04, 0x02, 0x08, 0x0a, 0x34, 0x75, 0xf3, 0x4e, 0x00, 0x00, 0x00, 0x00,
        0x01, 0x03, 0x03, 0x0a,
    ];

    #[test]
    fn literal_loopback_syn() {
        let m = parse(&LO_SYN, ETH, 0).unwrap();
        assert_eq!(m, PacketMeta { src_port: 51234, dst_port: 5432, ipv6: false });
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
                    Ok(m) => assert_eq!(m, full, "prefix {n} parsed differently"),
                    Err(e) => assert!(
                        matches!(e, ParseError::Link | ParseError::Truncated | ParseError::NotIp),
                        "prefix {n}: {e:?}"
                    ),
                }
            }
        }
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
