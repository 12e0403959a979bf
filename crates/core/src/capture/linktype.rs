//! The link types the libpcap backend reads, free of libpcap and of PostgreSQL: from a
//! link type number and a captured frame to what the header parser needs (where the
//! network header starts, its ethertype, and the packet type where the frame says).
//!
//! Numbers are libpcap's DLT_* values as `pcap_datalink` returns them (for savefiles
//! libpcap maps the LINKTYPE_* numbers back to DLT_* values, but not every one).
//! The systems the portable build is for give: Ethernet on real and virtual NICs
//! everywhere; DLT_NULL on the BSD and macOS loopback (DLT_LOOP on OpenBSD); DLT_RAW on
//! tunnels; the Linux cooked headers when libpcap cannot give a device's own header.

use super::filter::{LinkLayer, ETHERTYPE_IPV4, ETHERTYPE_IPV6, PACKET_HOST, PACKET_OUTGOING};

pub const DLT_NULL: i32 = 0;
pub const DLT_EN10MB: i32 = 1;
pub const DLT_RAW: i32 = 12;
/// DLT_RAW's number on OpenBSD.
pub const DLT_RAW_OPENBSD: i32 = 14;
/// LINKTYPE_RAW: DLT_RAW's number in savefiles, where libpcap leaves it as it is.
pub const LINKTYPE_RAW: i32 = 101;
pub const DLT_LOOP: i32 = 108;
pub const DLT_LINUX_SLL: i32 = 113;
pub const DLT_LINUX_SLL2: i32 = 276;

/// What the error for any other link type lists.
pub const SUPPORTED: &str = "EN10MB, NULL, LOOP, RAW, LINUX_SLL and LINUX_SLL2";

/// AF_INET: 2 on every system.
const AF_INET: u32 = 2;
/// AF_INET6: 10 on Linux, 24 on NetBSD and OpenBSD, 28 on FreeBSD and DragonFly, 30 on
/// macOS. A savefile may come from any of them, so all are IPv6 here (none is anything
/// else on another of these systems).
const AF_INET6: [u32; 4] = [10, 24, 28, 30];

const SLL_HEADER_LEN: usize = 16;
const SLL2_HEADER_LEN: usize = 20;
const NULL_HEADER_LEN: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkType {
    /// Ethernet II (also Linux's `lo`).
    Ethernet,
    /// BSD loopback: the address family as 4 bytes in the capturing host's byte order.
    Null,
    /// OpenBSD loopback: the same in network byte order.
    Loop,
    /// No link header: the frame starts with the IPv4 or IPv6 header.
    Raw,
    /// Linux cooked header v1: packet type, ARPHRD type, address, protocol (16 bytes).
    LinuxSll,
    /// Linux cooked header v2: protocol, ifindex, ARPHRD type, packet type, address (20).
    LinuxSll2,
}

impl LinkType {
    pub fn from_dlt(dlt: i32) -> Option<LinkType> {
        match dlt {
            DLT_EN10MB => Some(LinkType::Ethernet),
            DLT_NULL => Some(LinkType::Null),
            DLT_LOOP => Some(LinkType::Loop),
            DLT_RAW | DLT_RAW_OPENBSD | LINKTYPE_RAW => Some(LinkType::Raw),
            DLT_LINUX_SLL => Some(LinkType::LinuxSll),
            DLT_LINUX_SLL2 => Some(LinkType::LinuxSll2),
            _ => None,
        }
    }

    /// How the frames `decode` hands on start: Ethernet as captured, the others with
    /// their link header stripped.
    pub fn layer(self) -> LinkLayer {
        match self {
            LinkType::Ethernet => LinkLayer::Ethernet,
            _ => LinkLayer::Cooked,
        }
    }

    /// Whether each frame's link header says which way it went (the cooked headers'
    /// packet type); Ethernet tells by the source address instead.
    pub fn has_pkttype(self) -> bool {
        matches!(self, LinkType::LinuxSll | LinkType::LinuxSll2)
    }

    /// Whether libpcap's `vlan` keyword works on this link type (Ethernet only here).
    pub fn has_vlan(self) -> bool {
        self == LinkType::Ethernet
    }
}

/// A frame as the header parser takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// From the network header on (Ethernet: the whole frame). Empty when the frame is
    /// shorter than its link header.
    pub data: &'a [u8],
    /// Ethertype of the network header (host order); 0 when the link header is not IP.
    pub protocol: u16,
    /// PACKET_OUTGOING for a frame this host sent, else what the frame says, else
    /// PACKET_HOST.
    pub pkttype: u8,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The ethertype for a DLT_NULL / DLT_LOOP address family, read in either byte order: a
/// family is a small number, so read the wrong way round it is never one we know.
fn family_ethertype(h: [u8; 4]) -> u16 {
    let of = |af: u32| match af {
        AF_INET => Some(ETHERTYPE_IPV4),
        af if AF_INET6.contains(&af) => Some(ETHERTYPE_IPV6),
        _ => None,
    };
    of(u32::from_le_bytes(h)).or_else(|| of(u32::from_be_bytes(h))).unwrap_or(0)
}

/// Reads the link header of `frame`. `own_mac` is the Ethernet device's own address: a
/// frame from it was sent by this host.
#[inline]
pub fn decode(kind: LinkType, frame: &[u8], own_mac: Option<[u8; 6]>) -> Decoded<'_> {
    let short = Decoded { data: &[], protocol: 0, pkttype: PACKET_HOST };
    match kind {
        LinkType::Ethernet => {
            let sent = own_mac.is_some_and(|m| frame.get(6..12) == Some(&m[..]));
            let protocol = frame.get(12..14).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            Decoded { data: frame, protocol, pkttype: if sent { PACKET_OUTGOING } else { PACKET_HOST } }
        }
        LinkType::Null | LinkType::Loop => match frame.split_first_chunk::<NULL_HEADER_LEN>() {
            Some((h, rest)) => Decoded { data: rest, protocol: family_ethertype(*h), pkttype: PACKET_HOST },
            None => short,
        },
        LinkType::Raw => {
            let protocol = match frame.first().map(|b| b >> 4) {
                Some(4) => ETHERTYPE_IPV4,
                Some(6) => ETHERTYPE_IPV6,
                _ => 0,
            };
            Decoded { data: frame, protocol, pkttype: PACKET_HOST }
        }
        LinkType::LinuxSll if frame.len() >= SLL_HEADER_LEN => Decoded {
            data: &frame[SLL_HEADER_LEN..],
            protocol: be16(frame, 14),
            pkttype: u8::try_from(be16(frame, 0)).unwrap_or(PACKET_HOST),
        },
        LinkType::LinuxSll2 if frame.len() >= SLL2_HEADER_LEN => {
            Decoded { data: &frame[SLL2_HEADER_LEN..], protocol: be16(frame, 0), pkttype: frame[10] }
        }
        LinkType::LinuxSll | LinkType::LinuxSll2 => short,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::packet::{parse, ParseError};
    use crate::capture::testframes::{eth_ipv4_tcp, eth_ipv6_tcp};

    #[test]
    fn numbers() {
        let all = [(0, LinkType::Null), (1, LinkType::Ethernet), (12, LinkType::Raw), (14, LinkType::Raw)];
        let all2 = [(101, LinkType::Raw), (108, LinkType::Loop), (113, LinkType::LinuxSll), (276, LinkType::LinuxSll2)];
        for (n, k) in all.into_iter().chain(all2) {
            assert_eq!(LinkType::from_dlt(n), Some(k), "{n}");
        }
        // PPP, IEEE 802.11, radiotap, PFLOG, ENC, IPNET, USB: not read.
        for n in [9, 105, 127, 117, 109, 226, 220, -1, 2, 13] {
            assert_eq!(LinkType::from_dlt(n), None, "{n}");
        }
    }

    #[test]
    fn null_and_loop_read_the_family_either_way_round() {
        let v4 = eth_ipv4_tcp(40000, 5432, 0)[14..].to_vec();
        let v6 = eth_ipv6_tcp(40000, 5432)[14..].to_vec();
        for kind in [LinkType::Null, LinkType::Loop] {
            for (af, packet, want) in
                [(2u32, &v4, ETHERTYPE_IPV4), (10, &v6, ETHERTYPE_IPV6), (24, &v6, ETHERTYPE_IPV6)]
                    .into_iter()
                    .chain([(28, &v6, ETHERTYPE_IPV6), (30, &v6, ETHERTYPE_IPV6)])
            {
                for h in [af.to_le_bytes(), af.to_be_bytes()] {
                    let f = [&h[..], packet].concat();
                    let d = decode(kind, &f, None);
                    assert_eq!((d.data, d.protocol, d.pkttype), (&packet[..], want, PACKET_HOST), "{kind:?} {h:?}");
                    assert_eq!(parse(d.data, kind.layer(), d.protocol).unwrap().dst_port, 5432);
                }
            }
            // AF_UNIX, an unknown family, garbage: not IP, never parsed as such.
            for h in [[1, 0, 0, 0], [0, 0, 0, 7], [2, 0, 0, 2], [0xff; 4]] {
                let f = [&h[..], &v4].concat();
                let d = decode(kind, &f, None);
                assert_eq!(d.protocol, 0, "{h:?}");
                assert_eq!(parse(d.data, kind.layer(), d.protocol), Err(ParseError::NotIp));
            }
            assert_eq!(decode(kind, &[2, 0, 0], None).data, &[] as &[u8]);
        }
    }

    #[test]
    fn raw_reads_the_version() {
        let v4 = eth_ipv4_tcp(1, 2, 0)[14..].to_vec();
        let v6 = eth_ipv6_tcp(1, 2)[14..].to_vec();
        assert_eq!(decode(LinkType::Raw, &v4, None).protocol, ETHERTYPE_IPV4);
        assert_eq!(decode(LinkType::Raw, &v6, None).protocol, ETHERTYPE_IPV6);
        assert_eq!(decode(LinkType::Raw, &[0x50, 0, 0], None).protocol, 0);
        assert_eq!(decode(LinkType::Raw, &[], None).protocol, 0);
    }

    #[test]
    fn cooked_headers_give_protocol_and_packet_type() {
        let v6 = eth_ipv6_tcp(5432, 1)[14..].to_vec();
        let mut sll = [0u8; 16];
        sll[1] = 4; // outgoing
        sll[14..16].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let f = [&sll[..], &v6].concat();
        assert_eq!(decode(LinkType::LinuxSll, &f, None), Decoded { data: &v6, protocol: ETHERTYPE_IPV6, pkttype: 4 });
        let mut sll2 = [0u8; 20];
        sll2[0..2].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        sll2[10] = 0;
        let f2 = [&sll2[..], &v6].concat();
        assert_eq!(decode(LinkType::LinuxSll2, &f2, None), Decoded { data: &v6, protocol: ETHERTYPE_IPV6, pkttype: 0 });
        assert_eq!(decode(LinkType::LinuxSll, &f[..15], None).data, &[] as &[u8]);
        assert_eq!(decode(LinkType::LinuxSll2, &f2[..19], None).data, &[] as &[u8]);
    }

    #[test]
    fn ethernet_is_sent_when_it_comes_from_the_own_address() {
        let f = eth_ipv4_tcp(1, 2, 0);
        let own: [u8; 6] = f[6..12].try_into().unwrap();
        assert_eq!(decode(LinkType::Ethernet, &f, Some(own)).pkttype, PACKET_OUTGOING);
        assert_eq!(decode(LinkType::Ethernet, &f, Some([9; 6])).pkttype, PACKET_HOST);
        assert_eq!(decode(LinkType::Ethernet, &f, None).pkttype, PACKET_HOST);
        assert_eq!(decode(LinkType::Ethernet, &f, None).protocol, ETHERTYPE_IPV4);
        assert_eq!(decode(LinkType::Ethernet, &f[..5], None).protocol, 0);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut next = crate::capture::testframes::xorshift(0x1234_5678);
        for _ in 0..20_000 {
            let len = next() as usize % 64;
            let f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for k in [LinkType::Ethernet, LinkType::Null, LinkType::Loop, LinkType::Raw]
                .into_iter()
                .chain([LinkType::LinuxSll, LinkType::LinuxSll2])
            {
                let d = decode(k, &f, Some([1; 6]));
                let _ = parse(d.data, k.layer(), d.protocol);
            }
        }
    }
}
