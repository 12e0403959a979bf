//! Hand-built frames for unit tests (the benchmark builds its own). Checksums are
//! left zero: nothing here validates them, and neither does the kernel's BPF.

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn tcp(sport: u16, dport: u16) -> [u8; 20] {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4; // data offset: 5 words
    t[13] = 0x18; // PSH|ACK
    t
}

fn ipv4(proto: u8, options: usize, payload_len: usize) -> Vec<u8> {
    assert!(options.is_multiple_of(4) && options <= 40);
    let ihl = 20 + options;
    let mut h = vec![0u8; ihl];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&((ihl + payload_len) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&[127, 0, 0, 1]);
    h[16..20].copy_from_slice(&[127, 0, 0, 1]);
    for b in h.iter_mut().skip(20) {
        *b = 1; // NOP options
    }
    h
}

/// Ethernet + IPv4 (with `options` bytes of IP options) + TCP, no payload.
pub fn eth_ipv4_tcp(sport: u16, dport: u16, options: usize) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend_from_slice(&ipv4(6, options, 20));
    f.extend_from_slice(&tcp(sport, dport));
    f
}

pub fn eth_ipv4_udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend_from_slice(&ipv4(17, 0, 8));
    let mut u = [0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&8u16.to_be_bytes());
    f.extend_from_slice(&u);
    f
}

/// Ethernet + IPv6 + TCP, no payload.
pub fn eth_ipv6_tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut f = eth(0x86dd);
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&20u16.to_be_bytes());
    h[6] = 6;
    h[7] = 64;
    h[23] = 1; // ::1
    h[39] = 1;
    f.extend_from_slice(&h);
    f.extend_from_slice(&tcp(sport, dport));
    f
}

/// The same frame with an 802.1Q tag inserted after the MAC addresses.
pub fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// A tiny deterministic generator (xorshift32) for random and mutated test frames.
pub fn xorshift(mut seed: u32) -> impl FnMut() -> u32 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    }
}
