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

/// The secret of the flow and owner indexes' hash, drawn from the operating system's
/// randomness when the table is created (at each server start) and kept with the table
/// in shared memory, so every process hashes alike. A client chooses its ports, and its
/// address within its network: with a public hash it could choose keys whose home slots
/// are adjacent, one probe run thousands long that every packet and every login walks
/// under the flows lock (issue 29). Keyed, where a key lands cannot be computed from
/// outside. The hash is aHash (`ahash`), keyed by these four words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashKey(pub [u64; 4]);

impl HashKey {
    /// A new key from the operating system's randomness (std's hash seeds, which it draws
    /// from getrandom or its equivalent on each platform).
    pub fn random() -> HashKey {
        use std::hash::BuildHasher;
        let seeds = std::collections::hash_map::RandomState::new();
        HashKey(std::array::from_fn(|i| seeds.hash_one(i)))
    }

    fn hash(&self, words: &[u64]) -> u64 {
        let [k0, k1, k2, k3] = self.0;
        ahash::RandomState::with_seeds(k0, k1, k2, k3).hash_one(words)
    }
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

    pub fn hash(&self, key: &HashKey) -> u64 {
        let ports = (self.client_port as u64) << 32 | (self.server_port as u64) << 16 | self.ipv6 as u64;
        key.hash(&[
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
    pub fn hash(&self, key: &HashKey) -> u64 {
        let ports = (self.client_port as u64) << 32 | (self.server_port as u64) << 16 | self.ipv6 as u64;
        key.hash(&[word(&self.client_addr[..8]), word(&self.client_addr[8..]), ports])
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::index;

    /// The unkeyed hash these indexes used before (multiply-rotate over the key's words):
    /// what a peer could compute.
    fn public_hash(k: &FlowKey) -> u64 {
        let ports = (k.client_port as u64) << 32 | (k.server_port as u64) << 16 | k.ipv6 as u64;
        let words = [
            word(&k.client_addr[..8]),
            word(&k.client_addr[8..]),
            word(&k.server_addr[..8]),
            word(&k.server_addr[8..]),
            word(&k.device[..8]),
            word(&k.device[8..]),
            ports,
        ];
        let mut h = 0u64;
        for w in words {
            h = (h.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
        h ^ (h >> 29)
    }

    /// The longest probe of any key after inserting them all: how far the slowest
    /// lookup walks.
    fn longest_probe(keys: &[FlowKey], len: usize, hash: impl Fn(&FlowKey) -> u64) -> usize {
        let mut idx = vec![0u32; len];
        let mut longest = 0;
        for (pos, k) in keys.iter().enumerate() {
            let h = hash(k);
            let (slot, found) = index::find(&idx, h, |p| keys[p] == *k);
            assert!(!found);
            idx[slot] = pos as u32 + 1;
            longest = longest.max((slot + len - (h as usize & (len - 1))) & (len - 1));
        }
        longest
    }

    #[test]
    fn ports_chosen_to_collide_under_a_public_hash_spread_out_under_the_keyed_one() {
        // One client, the default max_flows (1,024: an index of 2,048 slots). It tries
        // every port and keeps those whose home slot, under the public hash, falls in
        // the first 16 slots: about one port in 128, all in one run.
        let len = index::len_for(1024);
        let flow = |port: u16| {
            let mut k =
                FlowKey { client_port: port, server_port: 5432, device: device_bytes("eth0"), ..FlowKey::default() };
            k.client_addr[..4].copy_from_slice(&[203, 0, 113, 9]);
            k.server_addr[..4].copy_from_slice(&[192, 0, 2, 1]);
            k
        };
        let chosen: Vec<FlowKey> =
            (1024..=u16::MAX).map(flow).filter(|k| public_hash(k) as usize & (len - 1) < 16).take(500).collect();
        assert_eq!(chosen.len(), 500);
        let before = longest_probe(&chosen, len, public_hash);
        assert!(before >= 450, "{before}");
        for _ in 0..20 {
            let key = HashKey::random();
            let after = longest_probe(&chosen, len, |k| k.hash(&key));
            // 500 keys in 2,048 slots at random: the longest probe is a dozen or so.
            assert!(after <= 40, "{after}");
        }
    }
}
