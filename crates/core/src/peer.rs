//! Who is at the other end of a connection, in the terms an egress bill uses: the class
//! of the client's address (loopback, private ranges, link-local, public) and the kind of
//! backend serving it (client backend or walsender). Pure: used by the capture's flow
//! table (`flows`) and by the backends' own counters (`statements::conns`).

/// The class of a client address. Cloud providers bill traffic to public addresses
/// (and often across zones within private ranges); loopback and link-local traffic never
/// leaves the host or its link.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerClass {
    /// 127.0.0.0/8, ::1.
    #[default]
    Loopback = 0,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (carrier-grade NAT, RFC 6598, used inside
    /// clouds), fc00::/7 (unique local).
    Private = 1,
    /// 169.254/16, fe80::/10.
    LinkLocal = 2,
    /// Everything else.
    Public = 3,
}

pub const PEER_CLASSES: [PeerClass; 4] =
    [PeerClass::Loopback, PeerClass::Private, PeerClass::LinkLocal, PeerClass::Public];

impl PeerClass {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerClass::Loopback => "loopback",
            PeerClass::Private => "private",
            PeerClass::LinkLocal => "link-local",
            PeerClass::Public => "public",
        }
    }

    pub fn from_u8(v: u8) -> PeerClass {
        PEER_CLASSES.get(v as usize).copied().unwrap_or(PeerClass::Public)
    }
}

/// The class of `addr` (IPv4 in its first 4 bytes when `!ipv6`; an IPv4-mapped IPv6
/// address is expected already turned into IPv4, as packets and sockets carry it).
pub fn classify(addr: &[u8; 16], ipv6: bool) -> PeerClass {
    if !ipv6 {
        return match addr[..4] {
            [127, ..] => PeerClass::Loopback,
            [10, ..] | [192, 168, ..] => PeerClass::Private,
            [172, b, ..] if b & 0xf0 == 16 => PeerClass::Private,
            [100, b, ..] if b & 0xc0 == 64 => PeerClass::Private,
            [169, 254, ..] => PeerClass::LinkLocal,
            _ => PeerClass::Public,
        };
    }
    let loopback = addr[..15].iter().all(|&b| b == 0) && addr[15] == 1;
    if loopback {
        PeerClass::Loopback
    } else if addr[0] & 0xfe == 0xfc {
        PeerClass::Private
    } else if addr[0] == 0xfe && addr[1] & 0xc0 == 0x80 {
        PeerClass::LinkLocal
    } else {
        PeerClass::Public
    }
}

/// The kind of backend at our end of the connection, as far as it is known.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackendKind {
    /// No backend registered the connection (yet): refused early, a scan, a connection
    /// older than the server's start, or one the registry had no room for.
    #[default]
    Unknown = 0,
    Client = 1,
    WalSender = 2,
}

pub const BACKEND_KINDS: [BackendKind; 3] = [BackendKind::Unknown, BackendKind::Client, BackendKind::WalSender];

impl BackendKind {
    /// As pg_stat_activity.backend_type says it; NULL (None) when unknown.
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            BackendKind::Unknown => None,
            BackendKind::Client => Some("client backend"),
            BackendKind::WalSender => Some("walsender"),
        }
    }

    pub fn from_u8(v: u8) -> BackendKind {
        BACKEND_KINDS.get(v as usize).copied().unwrap_or(BackendKind::Unknown)
    }
}

/// One row per (peer class, backend kind).
pub const EGRESS_ROWS: usize = PEER_CLASSES.len() * BACKEND_KINDS.len();

pub fn egress_row(class: PeerClass, kind: BackendKind) -> u8 {
    class as u8 * BACKEND_KINDS.len() as u8 + kind as u8
}

pub fn egress_labels(row: usize) -> (PeerClass, BackendKind) {
    (PeerClass::from_u8((row / BACKEND_KINDS.len()) as u8), BackendKind::from_u8((row % BACKEND_KINDS.len()) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> PeerClass {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&a);
        classify(&addr, false)
    }

    fn v6(s: &str) -> PeerClass {
        let a: std::net::Ipv6Addr = s.parse().unwrap();
        classify(&a.octets(), true)
    }

    #[test]
    fn ipv4_ranges_and_their_edges() {
        use PeerClass::*;
        for (a, c) in [
            ([127, 0, 0, 1], Loopback),
            ([127, 255, 255, 254], Loopback),
            ([128, 0, 0, 1], Public),
            ([126, 255, 255, 255], Public),
            ([10, 0, 0, 1], Private),
            ([11, 0, 0, 1], Public),
            ([172, 15, 255, 255], Public),
            ([172, 16, 0, 0], Private),
            ([172, 31, 255, 255], Private),
            ([172, 32, 0, 0], Public),
            ([192, 168, 1, 1], Private),
            ([192, 169, 0, 1], Public),
            ([100, 63, 255, 255], Public),
            ([100, 64, 0, 0], Private),
            ([100, 127, 255, 255], Private),
            ([100, 128, 0, 0], Public),
            ([169, 254, 77, 2], LinkLocal),
            ([169, 253, 0, 1], Public),
            ([8, 8, 8, 8], Public),
        ] {
            assert_eq!(v4(a), c, "{a:?}");
        }
    }

    #[test]
    fn ipv6_ranges_and_their_edges() {
        use PeerClass::*;
        for (a, c) in [
            ("::1", Loopback),
            ("::2", Public),
            ("::", Public),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fe00::1", Public),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", Public),
            ("2001:db8::1", Public),
        ] {
            assert_eq!(v6(a), c, "{a}");
        }
    }

    #[test]
    fn every_row_has_its_own_labels() {
        let mut seen = std::collections::BTreeSet::new();
        for c in PEER_CLASSES {
            for k in BACKEND_KINDS {
                let r = egress_row(c, k) as usize;
                assert!(r < EGRESS_ROWS);
                assert_eq!(egress_labels(r), (c, k));
                assert!(seen.insert(r));
            }
        }
        assert_eq!(seen.len(), EGRESS_ROWS);
    }
}
