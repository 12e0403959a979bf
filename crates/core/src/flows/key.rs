//! What identifies a flow and a backend's connection, and the names they carry.

use crate::capture::packet::PacketMeta;
use crate::capture::{is_ours, Direction};

/// PostgreSQL's NAMEDATALEN: role and database names fit, NUL included.
pub const NAME_LEN: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    /// Network device name, NUL-padded (IFNAMSIZ).
    pub device: [u8; 16],
    pub ipv6: bool,
}

/// A backend's own view of its connection: client address and port, server port. The
/// device is not known to a backend, so this is what owner records are keyed by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerKey {
    pub client_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub ipv6: bool,
}

/// Multiply-rotate over 8-byte words (as rustc's FxHash does): a handful of instructions
/// per key, where a byte-wise hash cost more than the rest of the per-packet work. Keys
/// are not secret; a collision only lengthens a probe.
fn mix(words: &[u64]) -> u64 {
    let mut h = 0u64;
    for &w in words {
        h = (h.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    h ^ (h >> 29)
}

fn word(b: &[u8]) -> u64 {
    u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]))
}

impl FlowKey {
    /// The flow a packet belongs to. The server side is the one on one of our ports;
    /// when both or neither are, the direction decides ("in" comes from the client).
    pub fn of(device: [u8; 16], dir: Direction, m: &PacketMeta, ports: &[u16]) -> FlowKey {
        let (src_ours, dst_ours) = (is_ours(ports, m.src_port), is_ours(ports, m.dst_port));
        let from_client = if src_ours != dst_ours { dst_ours } else { dir == Direction::In };
        let (client_addr, client_port, server_addr, server_port) = if from_client {
            (m.src_addr, m.src_port, m.dst_addr, m.dst_port)
        } else {
            (m.dst_addr, m.dst_port, m.src_addr, m.src_port)
        };
        FlowKey { client_addr, server_addr, client_port, server_port, device, ipv6: m.ipv6 }
    }

    pub fn hash(&self) -> u64 {
        let ports = (self.client_port as u64) << 32 | (self.server_port as u64) << 16 | self.ipv6 as u64;
        mix(&[
            word(&self.client_addr[..8]),
            word(&self.client_addr[8..]),
            word(&self.server_addr[..8]),
            word(&self.server_addr[8..]),
            word(&self.device[..8]),
            word(&self.device[8..]),
            ports,
        ])
    }

    /// The key of the owner record a backend writes for this connection.
    pub fn owner_key(&self) -> OwnerKey {
        OwnerKey {
            client_addr: self.client_addr,
            client_port: self.client_port,
            server_port: self.server_port,
            ipv6: self.ipv6,
        }
    }
}

impl OwnerKey {
    pub fn hash(&self) -> u64 {
        let ports = (self.client_port as u64) << 32 | (self.server_port as u64) << 16 | self.ipv6 as u64;
        mix(&[word(&self.client_addr[..8]), word(&self.client_addr[8..]), ports])
    }
}

pub fn name_bytes(s: &[u8]) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let n = s.len().min(NAME_LEN - 1);
    out[..n].copy_from_slice(&s[..n]);
    out
}

pub fn name_str(n: &[u8]) -> &str {
    let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
    std::str::from_utf8(&n[..end]).unwrap_or("?")
}

/// A device name as a flow key holds it.
pub fn device_bytes(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}
