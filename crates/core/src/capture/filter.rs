//! Classic BPF program for "tcp and (port P1 or port P2 ...)", built in Rust so the
//! default build needs no libpcap to compile a filter.
//!
//! The program runs in the kernel on every frame the packet socket sees; anything it
//! rejects never reaches the ring, so traffic on other ports costs us nothing but the
//! filter run. It returns `snaplen` for accepted frames, which makes the kernel truncate
//! the copy in the ring (the original length stays in `tp_len`).
//!
//! Shape per network layer (what `tcpdump -d 'tcp and port P'` prints, plus a check of
//! the version nibble, which tcpdump leaves out and the kernel's IP stack does not):
//! IPv6: version 6, next header at +6 must be TCP, ports at +40 / +42 (no extension
//! headers; like tcpdump, a TCP header behind IPv6 extension headers is not matched).
//! IPv4: version 4 with a header of 5+ words, protocol at +9 must be TCP, fragment offset
//! at +6 must be 0 (later fragments carry no ports), X = header length, ports at X / X+2.

use std::fmt;

// Opcode parts from <linux/filter.h>; the kernel ABI fixes these values.
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_IND: u16 = 0x40;
const BPF_MSH: u16 = 0xa0;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;

/// Offsets of the kernel's "ancillary data" loads (SKF_AD_*), which read skb metadata
/// instead of packet bytes.
const SKF_AD_OFF: i32 = -0x1000;
const SKF_AD_PROTOCOL: i32 = 0;
const SKF_AD_PKTTYPE: i32 = 4;

pub use super::field::ethertype::{
    IPV4 as ETHERTYPE_IPV4, IPV6 as ETHERTYPE_IPV6, QINQ as ETHERTYPE_QINQ, VLAN as ETHERTYPE_VLAN,
};
pub use super::field::tcp::PROTOCOL as IPPROTO_TCP;
use super::field::{ethernet, ipv4, ipv6, tcp};
/// `sll_pkttype` of a frame the host sends (linux/if_packet.h).
pub const PACKET_OUTGOING: u8 = 4;
pub const PACKET_HOST: u8 = 0;

/// Largest number of ports one program matches. Keeps every conditional jump within the
/// 8-bit offset classic BPF allows.
pub const MAX_PORTS: usize = 16;

/// One classic BPF instruction, laid out as `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl fmt::Debug for SockFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{ 0x{:02x}, {}, {}, 0x{:08x} }}", self.code, self.jt, self.jf, self.k)
    }
}

/// How the frames of a device start, which decides where the network header is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// Ethernet II header (also what `lo` and veth show): network header at 14, or 18
    /// behind one in-band 802.1Q tag.
    Ethernet,
    /// No link header (a SOCK_DGRAM socket, used for devices such as tun or wireguard):
    /// the network header is at 0 and the ethertype is skb metadata.
    Cooked,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterSpec {
    pub ports: Vec<u16>,
    pub snaplen: u32,
    pub link: LinkLayer,
    /// Reject the outgoing copy the loopback device delivers of every frame, so each
    /// packet reaches the ring once (tcpdump drops the same copy, in user space).
    pub drop_outgoing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterError {
    NoPorts,
    TooManyPorts(usize),
    ZeroPort,
    ZeroSnaplen,
    JumpTooFar,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::NoPorts => write!(f, "no TCP port to capture"),
            FilterError::TooManyPorts(n) => {
                write!(f, "{n} ports requested, at most {MAX_PORTS} can be captured")
            }
            FilterError::ZeroPort => write!(f, "port 0 cannot be captured"),
            FilterError::ZeroSnaplen => write!(f, "snapshot length must be positive"),
            FilterError::JumpTooFar => write!(f, "filter program too long for classic BPF jumps"),
        }
    }
}

impl std::error::Error for FilterError {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Label {
    Accept,
    Reject,
    Ipv4(u8),
    Ipv6(u8),
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Next,
    To(Label),
}

#[derive(Clone, Copy, Debug)]
enum Insn {
    Stmt { code: u16, k: u32 },
    Jump { code: u16, k: u32, jt: Target, jf: Target },
    Mark(Label),
}

/// A tiny assembler: instructions with symbolic targets, resolved to relative offsets.
struct Asm {
    insns: Vec<Insn>,
}

impl Asm {
    fn stmt(&mut self, code: u16, k: u32) {
        self.insns.push(Insn::Stmt { code, k });
    }
    fn jeq(&mut self, k: u32, jt: Target, jf: Target) {
        self.insns.push(Insn::Jump { code: BPF_JMP | BPF_JEQ | BPF_K, k, jt, jf });
    }
    fn jge(&mut self, k: u32, jt: Target, jf: Target) {
        self.insns.push(Insn::Jump { code: BPF_JMP | BPF_JGE | BPF_K, k, jt, jf });
    }
    fn jgt(&mut self, k: u32, jt: Target, jf: Target) {
        self.insns.push(Insn::Jump { code: BPF_JMP | BPF_JGT | BPF_K, k, jt, jf });
    }
    /// Continues only if lo <= A <= hi.
    fn in_range(&mut self, lo: u32, hi: u32, reject: Target) {
        self.jge(lo, Target::Next, reject);
        self.jgt(hi, reject, Target::Next);
    }
    fn jset(&mut self, k: u32, jt: Target, jf: Target) {
        self.insns.push(Insn::Jump { code: BPF_JMP | BPF_JSET | BPF_K, k, jt, jf });
    }
    fn mark(&mut self, l: Label) {
        self.insns.push(Insn::Mark(l));
    }

    fn assemble(self) -> Result<Vec<SockFilter>, FilterError> {
        let mut positions: Vec<(Label, usize)> = Vec::new();
        let mut pc = 0usize;
        for i in &self.insns {
            match i {
                Insn::Mark(l) => positions.push((*l, pc)),
                _ => pc += 1,
            }
        }
        let find = |l: Label| positions.iter().find(|(x, _)| *x == l).map(|(_, p)| *p);
        let mut out = Vec::with_capacity(pc);
        for i in &self.insns {
            match *i {
                Insn::Mark(_) => {}
                Insn::Stmt { code, k } => out.push(SockFilter { code, jt: 0, jf: 0, k }),
                Insn::Jump { code, k, jt, jf } => {
                    let here = out.len();
                    let rel = |t: Target| -> Result<u8, FilterError> {
                        match t {
                            Target::Next => Ok(0),
                            Target::To(l) => {
                                let dest = find(l).ok_or(FilterError::JumpTooFar)?;
                                let off = dest.checked_sub(here + 1).ok_or(FilterError::JumpTooFar)?;
                                u8::try_from(off).map_err(|_| FilterError::JumpTooFar)
                            }
                        }
                    };
                    out.push(SockFilter { code, jt: rel(jt)?, jf: rel(jf)?, k });
                }
            }
        }
        Ok(out)
    }
}

/// Builds the program for `spec`. Ports are deduplicated; order does not matter.
// One function on purpose (about 90 lines): it is one straight BPF program, read top to
// bottom next to what `tcpdump -d` prints for the same filter.
pub fn build(spec: &FilterSpec) -> Result<Vec<SockFilter>, FilterError> {
    let mut ports = spec.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        return Err(FilterError::NoPorts);
    }
    if ports.len() > MAX_PORTS {
        return Err(FilterError::TooManyPorts(ports.len()));
    }
    if ports.contains(&0) {
        return Err(FilterError::ZeroPort);
    }
    if spec.snaplen == 0 {
        return Err(FilterError::ZeroSnaplen);
    }

    let mut a = Asm { insns: Vec::new() };
    let reject = Target::To(Label::Reject);
    let accept = Target::To(Label::Accept);

    if spec.drop_outgoing {
        a.stmt(BPF_LD | BPF_B | BPF_ABS, (SKF_AD_OFF + SKF_AD_PKTTYPE) as u32);
        a.jeq(PACKET_OUTGOING as u32, reject, Target::Next);
    }

    // Network-layer offsets to generate a matcher for: index 0 untagged, 1 behind one
    // in-band VLAN tag (Ethernet only; tags moved to metadata by the NIC or kernel look
    // untagged here).
    let nets: &[u32] = match spec.link {
        LinkLayer::Ethernet => {
            a.stmt(BPF_LD | BPF_H | BPF_ABS, ethernet::ETHERTYPE as u32);
            a.jeq(ETHERTYPE_IPV6 as u32, Target::To(Label::Ipv6(0)), Target::Next);
            a.jeq(ETHERTYPE_IPV4 as u32, Target::To(Label::Ipv4(0)), Target::Next);
            a.jeq(ETHERTYPE_VLAN as u32, Target::Next, reject);
            a.stmt(BPF_LD | BPF_H | BPF_ABS, ethernet::TAGGED_ETHERTYPE as u32);
            a.jeq(ETHERTYPE_IPV6 as u32, Target::To(Label::Ipv6(1)), Target::Next);
            a.jeq(ETHERTYPE_IPV4 as u32, Target::To(Label::Ipv4(1)), reject);
            &[ethernet::HEADER_LEN as u32, (ethernet::HEADER_LEN + ethernet::TAG_LEN) as u32]
        }
        LinkLayer::Cooked => {
            a.stmt(BPF_LD | BPF_H | BPF_ABS, (SKF_AD_OFF + SKF_AD_PROTOCOL) as u32);
            a.jeq(ETHERTYPE_IPV6 as u32, Target::To(Label::Ipv6(0)), Target::Next);
            a.jeq(ETHERTYPE_IPV4 as u32, Target::To(Label::Ipv4(0)), reject);
            &[0]
        }
    };

    let match_ports = |a: &mut Asm, last_miss: Target| {
        for (i, p) in ports.iter().enumerate() {
            let miss = if i + 1 == ports.len() { last_miss } else { Target::Next };
            a.jeq(*p as u32, accept, miss);
        }
    };

    for (idx, &l3) in nets.iter().enumerate() {
        let idx = idx as u8;
        a.mark(Label::Ipv6(idx));
        // Version 6 in the first nibble: the ethertype alone does not make a packet IPv6.
        a.stmt(BPF_LD | BPF_B | BPF_ABS, l3);
        a.in_range(0x60, 0x6f, reject);
        a.stmt(BPF_LD | BPF_B | BPF_ABS, l3 + ipv6::NEXT_HEADER as u32);
        a.jeq(IPPROTO_TCP as u32, Target::Next, reject);
        a.stmt(BPF_LD | BPF_H | BPF_ABS, l3 + (ipv6::HEADER_LEN + tcp::SRC_PORT) as u32);
        match_ports(&mut a, Target::Next);
        a.stmt(BPF_LD | BPF_H | BPF_ABS, l3 + (ipv6::HEADER_LEN + tcp::DST_PORT) as u32);
        match_ports(&mut a, reject);

        a.mark(Label::Ipv4(idx));
        // Version 4 and a header of at least 5 words, or the ports would be read from
        // inside the IP header.
        a.stmt(BPF_LD | BPF_B | BPF_ABS, l3);
        a.in_range(0x45, 0x4f, reject);
        a.stmt(BPF_LD | BPF_B | BPF_ABS, l3 + ipv4::PROTOCOL as u32);
        a.jeq(IPPROTO_TCP as u32, Target::Next, reject);
        a.stmt(BPF_LD | BPF_H | BPF_ABS, l3 + ipv4::FLAGS_FRAG as u32);
        a.jset(ipv4::FRAG_OFFSET_MASK as u32, reject, Target::Next);
        // X = 4 * IHL: the ports sit right after the IPv4 header, options included.
        a.stmt(BPF_LDX | BPF_B | BPF_MSH, l3 + ipv4::VER_IHL as u32);
        a.stmt(BPF_LD | BPF_H | BPF_IND, l3 + tcp::SRC_PORT as u32);
        match_ports(&mut a, Target::Next);
        a.stmt(BPF_LD | BPF_H | BPF_IND, l3 + tcp::DST_PORT as u32);
        match_ports(&mut a, reject);
    }

    a.mark(Label::Accept);
    a.stmt(BPF_RET | BPF_K, spec.snaplen);
    a.mark(Label::Reject);
    a.stmt(BPF_RET | BPF_K, 0);
    a.assemble()
}

/// What the kernel would tell an ancillary load about a frame.
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbMeta {
    pub pkttype: u8,
    pub protocol: u16,
}

/// Runs a program the way the kernel does, for the few opcodes `build` emits. Returns
/// the accepted length (0 = rejected), or `None` for a program the kernel would refuse
/// or an opcode this interpreter does not know. Out-of-bounds packet loads reject the
/// frame, as they do in the kernel.
pub fn run(prog: &[SockFilter], pkt: &[u8], meta: SkbMeta) -> Option<u32> {
    let load = |off: i64, size: usize| -> Result<u32, ()> {
        if off == (SKF_AD_OFF + SKF_AD_PKTTYPE) as i64 {
            return Ok(meta.pkttype as u32);
        }
        if off == (SKF_AD_OFF + SKF_AD_PROTOCOL) as i64 {
            return Ok(meta.protocol as u32);
        }
        let off = usize::try_from(off).map_err(|_| ())?;
        let b = pkt.get(off..off.checked_add(size).ok_or(())?).ok_or(())?;
        Ok(b.iter().fold(0u32, |acc, x| (acc << 8) | *x as u32))
    };
    let (mut acc, mut x) = (0u32, 0u32);
    let mut pc = 0usize;
    for _ in 0..=prog.len() {
        let i = *prog.get(pc)?;
        pc += 1;
        let size = match i.code & 0x18 {
            BPF_W => 4,
            BPF_H => 2,
            _ => 1,
        };
        match i.code {
            c if c == BPF_LD | BPF_ABS | (c & 0x18) => match load(i.k as i32 as i64, size) {
                Ok(v) => acc = v,
                Err(()) => return Some(0),
            },
            c if c == BPF_LD | BPF_IND | (c & 0x18) => match load(x as i64 + i.k as i32 as i64, size) {
                Ok(v) => acc = v,
                Err(()) => return Some(0),
            },
            c if c == BPF_LDX | BPF_B | BPF_MSH => match load(i.k as i64, 1) {
                Ok(v) => x = (v & 0xf) * 4,
                Err(()) => return Some(0),
            },
            c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
            c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                pc += if acc == i.k { i.jt } else { i.jf } as usize;
            }
            c if c == BPF_JMP | BPF_JGE | BPF_K => {
                pc += if acc >= i.k { i.jt } else { i.jf } as usize;
            }
            c if c == BPF_JMP | BPF_JGT | BPF_K => {
                pc += if acc > i.k { i.jt } else { i.jf } as usize;
            }
            c if c == BPF_JMP | BPF_JSET | BPF_K => {
                pc += if acc & i.k != 0 { i.jt } else { i.jf } as usize;
            }
            c if c == BPF_RET | BPF_K => return Some(i.k),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::testframes::*;

    fn spec(ports: &[u16]) -> FilterSpec {
        FilterSpec { ports: ports.to_vec(), snaplen: 96, link: LinkLayer::Ethernet, drop_outgoing: false }
    }

    fn host() -> SkbMeta {
        SkbMeta { pkttype: PACKET_HOST, protocol: ETHERTYPE_IPV4 }
    }

    #[test]
    fn one_port_matches_ipv4_either_direction() {
        let p = build(&spec(&[5432])).unwrap();
        assert_eq!(run(&p, &eth_ipv4_tcp(40000, 5432, 0), host()), Some(96));
        assert_eq!(run(&p, &eth_ipv4_tcp(5432, 40000, 0), host()), Some(96));
        assert_eq!(run(&p, &eth_ipv4_tcp(40000, 5433, 0), host()), Some(0));
        assert_eq!(run(&p, &eth_ipv4_udp(40000, 5432), host()), Some(0));
    }

    #[test]
    fn one_port_matches_ipv6_either_direction() {
        let p = build(&spec(&[5432])).unwrap();
        assert_eq!(run(&p, &eth_ipv6_tcp(40000, 5432), host()), Some(96));
        assert_eq!(run(&p, &eth_ipv6_tcp(5432, 40000), host()), Some(96));
        assert_eq!(run(&p, &eth_ipv6_tcp(40000, 80), host()), Some(0));
    }

    #[test]
    fn ipv4_options_move_the_ports() {
        let p = build(&spec(&[5432])).unwrap();
        // 40 bytes of options: the ports sit at 14 + 60.
        assert_eq!(run(&p, &eth_ipv4_tcp(40000, 5432, 40), host()), Some(96));
        assert_eq!(run(&p, &eth_ipv4_tcp(40000, 5431, 40), host()), Some(0));
    }

    #[test]
    fn later_fragments_are_not_matched_but_the_first_is() {
        let p = build(&spec(&[5432])).unwrap();
        let mut first = eth_ipv4_tcp(40000, 5432, 0);
        first[14 + 6] = 0x20; // more fragments, offset 0
        assert_eq!(run(&p, &first, host()), Some(96));
        let mut later = eth_ipv4_tcp(40000, 5432, 0);
        later[14 + 7] = 0x10; // offset 16 units: bytes here are payload, not ports
        assert_eq!(run(&p, &later, host()), Some(0));
    }

    #[test]
    fn in_band_vlan_tag_is_looked_through() {
        let p = build(&spec(&[5432])).unwrap();
        assert_eq!(run(&p, &vlan_tagged(&eth_ipv4_tcp(5432, 40000, 0), 7), host()), Some(96));
        assert_eq!(run(&p, &vlan_tagged(&eth_ipv6_tcp(40000, 5432), 7), host()), Some(96));
        assert_eq!(run(&p, &vlan_tagged(&eth_ipv4_tcp(1, 2, 0), 7), host()), Some(0));
    }

    #[test]
    fn several_ports_any_matches() {
        let p = build(&spec(&[6432, 5432, 5432])).unwrap();
        for port in [5432, 6432] {
            assert_eq!(run(&p, &eth_ipv4_tcp(50000, port, 0), host()), Some(96));
            assert_eq!(run(&p, &eth_ipv6_tcp(port, 50000), host()), Some(96));
        }
        assert_eq!(run(&p, &eth_ipv4_tcp(50000, 7432, 0), host()), Some(0));
    }

    #[test]
    fn maximum_port_count_still_assembles() {
        let ports: Vec<u16> = (1..=MAX_PORTS as u16).map(|i| 5000 + i).collect();
        let p = build(&spec(&ports)).unwrap();
        assert_eq!(run(&p, &eth_ipv4_tcp(50000, ports[MAX_PORTS - 1], 0), host()), Some(96));
        assert_eq!(run(&p, &vlan_tagged(&eth_ipv4_tcp(ports[0], 50000, 0), 1), host()), Some(96));
        let too_many: Vec<u16> = (1..=MAX_PORTS as u16 + 1).collect();
        assert_eq!(build(&spec(&too_many)), Err(FilterError::TooManyPorts(MAX_PORTS + 1)));
    }

    #[test]
    fn bad_specs_are_refused() {
        assert_eq!(build(&spec(&[])), Err(FilterError::NoPorts));
        assert_eq!(build(&spec(&[0])), Err(FilterError::ZeroPort));
        let mut s = spec(&[5432]);
        s.snaplen = 0;
        assert_eq!(build(&s), Err(FilterError::ZeroSnaplen));
    }

    #[test]
    fn loopback_outgoing_copy_is_dropped_in_kernel() {
        let mut s = spec(&[5432]);
        s.drop_outgoing = true;
        let p = build(&s).unwrap();
        let f = eth_ipv4_tcp(40000, 5432, 0);
        assert_eq!(run(&p, &f, host()), Some(96));
        let out = SkbMeta { pkttype: PACKET_OUTGOING, protocol: ETHERTYPE_IPV4 };
        assert_eq!(run(&p, &f, out), Some(0));
    }

    #[test]
    fn cooked_link_uses_skb_protocol() {
        let s = FilterSpec { ports: vec![5432], snaplen: 128, link: LinkLayer::Cooked, drop_outgoing: false };
        let p = build(&s).unwrap();
        let v4 = &eth_ipv4_tcp(40000, 5432, 0)[14..];
        let v6 = &eth_ipv6_tcp(5432, 1)[14..];
        assert_eq!(run(&p, v4, SkbMeta { pkttype: 0, protocol: ETHERTYPE_IPV4 }), Some(128));
        assert_eq!(run(&p, v6, SkbMeta { pkttype: 0, protocol: ETHERTYPE_IPV6 }), Some(128));
        assert_eq!(run(&p, v4, SkbMeta { pkttype: 0, protocol: 0x0806 }), Some(0));
    }

    #[test]
    fn truncated_and_garbage_frames_are_rejected_not_crashed() {
        let p = build(&spec(&[5432])).unwrap();
        let full = eth_ipv4_tcp(40000, 5432, 0);
        for n in 0..14 + 20 + 4 {
            assert_eq!(run(&p, &full[..n], host()), Some(0), "prefix of {n} bytes");
        }
        let mut next = xorshift(0x1234_5678);
        for len in 0..200 {
            let frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(run(&p, &frame, host()).is_some());
        }
    }

    /// The exact program for port 5432, written out by hand from the layout in the
    /// module comment (untagged v6 at 7, v4 at 16; tagged v6 at 28, v4 at 37; accept 49,
    /// reject 50), so a change to the generator shows up as a diff here.
    #[test]
    fn program_for_5432_is_stable() {
        let p = build(&spec(&[5432])).unwrap();
        let hex: Vec<String> = p.iter().map(|i| format!("{i:?}")).collect();
        let expected = [
            "{ 0x28, 0, 0, 0x0000000c }",   // 0 ldh [12]
            "{ 0x15, 5, 0, 0x000086dd }",   // 1 ipv6 -> 7
            "{ 0x15, 13, 0, 0x00000800 }",  // 2 ipv4 -> 16
            "{ 0x15, 0, 46, 0x00008100 }",  // 3 vlan, else reject (50)
            "{ 0x28, 0, 0, 0x00000010 }",   // 4 ldh [16]
            "{ 0x15, 22, 0, 0x000086dd }",  // 5 ipv6 -> 28
            "{ 0x15, 30, 43, 0x00000800 }", // 6 ipv4 -> 37, else reject
            "{ 0x30, 0, 0, 0x0000000e }",   // 7 ldb [14]: version
            "{ 0x35, 0, 41, 0x00000060 }",  // 8 >= 0x60, else reject
            "{ 0x25, 40, 0, 0x0000006f }",  // 9 > 0x6f -> reject
            "{ 0x30, 0, 0, 0x00000014 }",   // 10 ldb [20]: next header
            "{ 0x15, 0, 38, 0x00000006 }",  // 11 tcp, else reject
            "{ 0x28, 0, 0, 0x00000036 }",   // 12 ldh [54]
            "{ 0x15, 35, 0, 0x00001538 }",  // 13 -> accept (49)
            "{ 0x28, 0, 0, 0x00000038 }",   // 14 ldh [56]
            "{ 0x15, 33, 34, 0x00001538 }", // 15 accept / reject
            "{ 0x30, 0, 0, 0x0000000e }",   // 16 ldb [14]: version, IHL
            "{ 0x35, 0, 32, 0x00000045 }",  // 17 >= 0x45, else reject
            "{ 0x25, 31, 0, 0x0000004f }",  // 18 > 0x4f -> reject
            "{ 0x30, 0, 0, 0x00000017 }",   // 19 ldb [23]: protocol
            "{ 0x15, 0, 29, 0x00000006 }",  // 20 tcp, else reject
            "{ 0x28, 0, 0, 0x00000014 }",   // 21 ldh [20]
            "{ 0x45, 27, 0, 0x00001fff }",  // 22 later fragment -> reject
            "{ 0xb1, 0, 0, 0x0000000e }",   // 23 ldxb 4*([14]&0xf)
            "{ 0x48, 0, 0, 0x0000000e }",   // 24 ldh [x+14]
            "{ 0x15, 23, 0, 0x00001538 }",  // 25 -> accept
            "{ 0x48, 0, 0, 0x00000010 }",   // 26 ldh [x+16]
            "{ 0x15, 21, 22, 0x00001538 }", // 27 accept / reject
        ];
        assert_eq!(&hex[..expected.len()], &expected[..]);
        assert_eq!(p.len(), 51);
        assert_eq!(format!("{:?}", p[p.len() - 2]), "{ 0x06, 0, 0, 0x00000060 }");
        assert_eq!(format!("{:?}", p[p.len() - 1]), "{ 0x06, 0, 0, 0x00000000 }");
    }
}
