//! Header field offsets and values, in one place for the filter builder (which reads them
//! in the kernel) and the parser (which reads them here): the two must agree byte for
//! byte, so neither writes a number of its own. Offsets are from the start of their header.

pub mod ethernet {
    pub const ETHERTYPE: usize = 12;
    pub const HEADER_LEN: usize = 14;
    /// An 802.1Q / 802.1ad tag: TPID (where the ethertype was) and TCI, then the real
    /// ethertype.
    pub const TAG_LEN: usize = 4;
    /// The ethertype behind one tag.
    pub const TAGGED_ETHERTYPE: usize = ETHERTYPE + TAG_LEN;
}

pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const IPV6: u16 = 0x86dd;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88a8;
    /// The older, non-standard 802.1ad TPID some switches still send.
    pub const QINQ_OLD: u16 = 0x9100;
}

pub mod ipv4 {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub const VER_IHL: usize = 0;
    pub const TOTAL_LEN: usize = 2;
    /// Flags and fragment offset; the offset is the low 13 bits.
    pub const FLAGS_FRAG: usize = 6;
    pub const FRAG_OFFSET_MASK: u16 = 0x1fff;
    pub const PROTOCOL: usize = 9;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    pub const MIN_HEADER_LEN: usize = 20;
}

pub mod ipv6 {
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
    pub const HEADER_LEN: usize = 40;
    /// Next-header value of the fragment extension header.
    pub const FRAGMENT: u8 = 44;
    pub const FRAGMENT_HEADER_LEN: usize = 8;
    /// Fragment offset (13 bits, in 8-byte units) within the fragment header.
    pub const FRAGMENT_OFFSET: usize = 2;
    pub const FRAGMENT_OFFSET_MASK: u16 = 0xfff8;
}

pub mod tcp {
    pub const PROTOCOL: u8 = 6;
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    /// Data offset (header length in 32-bit words) in the high nibble.
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    /// Enough of the header for the fields above.
    pub const FIELDS_LEN: usize = 16;
    pub const MIN_HEADER_LEN: usize = 20;
}
