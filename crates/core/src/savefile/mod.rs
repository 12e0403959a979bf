//! The file that keeps what pg_netstat counted across server restarts, free of
//! PostgreSQL: its format, and writing it atomically. The worker fills a `SavedState`
//! from shared memory and back (src/persist.rs).
//!
//! Format (every integer little-endian):
//!
//! ```text
//! header, 32 bytes: magic "PGNETST\0" | format u32 | oldest_reader u32 | body_len u64 |
//!                   CRC-32 of the body u32 | 0 u32
//! body:             sections, each: tag u32 | record_len u32 | count u32 | count records
//! ```
//!
//! Sections (tag: record): 1 meta, 2 device, 3 interval, 4 role totals, 5 database
//! totals, 6 flow table counters, 7 statement row (pg_netstat_statements: kind u32 (1
//! statement, 2 setup, 3 other, 4 the table-wide overflow row) | userid u32 | dbid u32 |
//! 0 u32 | queryid u64 | calls, bytes_in, bytes_out, segments_in, segments_out,
//! retransmits, RTT sum (µs), RTT samples, RTT max (µs) u64 | first_seen, last_seen i64
//! (Unix µs)), 8 statement table counters (evictions u64 | overflow_charges u64 |
//! stats_reset i64), 9 egress totals (row u32 (`peer::egress_row`: peer class × 3 +
//! backend kind) | 0 u32 | connections u64 | counters | TCP counters), 10 application
//! totals (role, database, application: 64 bytes each | peer class u32 | backend kind u32
//! | connections, bytes_in, bytes_out, segments_in, segments_out, retransmits u64; all
//! names empty: the overflow row), 11 application table counters (stats_reset i64 |
//! application_overflow u64). Sections 7 to 11 came after the first release; its
//! readers skip them. A later kind of statement row goes in a section of its own: a
//! reader refuses a kind it does not know.
//!
//! How versions read each other's files: a section's records carry their own length, so
//! a later version may append fields to a record (an older reader skips them; a newer
//! reader reading an older file sees the missing fields as 0) and add sections (readers
//! skip tags they do not know). Only a change that an older reader would misread raises
//! `oldest_reader`, and a reader refuses a file whose `oldest_reader` is above its own
//! `FORMAT`. Nothing in the file is a Rust memory layout.
//!
//! Rooms: this file holds the format's constants and types; `encode` writes them,
//! `decode` reads and checks them (a file is hostile input), `files` puts the bytes on
//! disk atomically and sets a bad file aside.

mod decode;
mod encode;
mod files;
#[cfg(test)]
mod tests;

#[cfg(test)]
use decode::LATEST_UNIX_US;
pub use decode::{decode, LATEST_UNIX_S, LONGEST_INTERVAL_S};
pub use encode::encode;
pub use files::{begin_load, end_load, load_unfinished, loading_mark, read, set_aside, write_atomically};

use crate::capture::{valid_device_name, MAX_DEVICES};
use crate::counters::{Counters, TcpCounters};
use crate::flows::{Totals, NAME_LEN, TOTALS_ROWS};
use crate::history::{Slot, MAX_HISTORY};
use crate::peer::{BACKEND_KINDS, EGRESS_ROWS, PEER_CLASSES};
use crate::statements::conns::{AppKey, AppRow, Socket, APP_ROWS};
use crate::statements::table::{Row, TableCounters, MOST_ENTRIES};
use crate::statements::{Figures, Kind, StmtKey};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The file, relative to the data directory (PostgreSQL keeps its own statistics file,
/// and pg_stat_statements its, in the same directory).
pub const DIR: &str = "pg_stat";
pub const FILE_NAME: &str = "pg_netstat.stat";
const MAGIC: [u8; 8] = *b"PGNETST\0";
/// The format this build writes, and the newest whose files it can read (2: the
/// statement sections added).
pub const FORMAT: u32 = 2;
/// The oldest reader that can read what this build writes.
const OLDEST_READER: u32 = 1;
const HEADER_LEN: usize = 32;
const SECTION_HEADER_LEN: usize = 12;
const DEVICE_NAME_LEN: usize = 16;
const WRITER_LEN: usize = 16;

const META: u32 = 1;
const DEVICE: u32 = 2;
const ROW: u32 = 3;
const ROLE: u32 = 4;
const DATABASE: u32 = 5;
const FLOW_STATS: u32 = 6;
const STATEMENT: u32 = 7;
const STATEMENT_TABLE: u32 = 8;
const EGRESS: u32 = 9;
const APPLICATION: u32 = 10;
const APPLICATION_TABLE: u32 = 11;

/// The shortest record and the most records a known section may have: no version writes
/// more than can exist, and no field is shorter than 8 bytes. A hostile file (its
/// checksum is no defence: anyone can compute one) must not make the reader loop or
/// allocate beyond what a real file of the largest configuration needs.
fn limits(tag: u32) -> Option<(usize, usize)> {
    match tag {
        META | FLOW_STATS | STATEMENT_TABLE | APPLICATION_TABLE => Some((8, 1)),
        EGRESS => Some((8, EGRESS_ROWS)),
        APPLICATION => Some((8, APP_ROWS)),
        STATEMENT => Some((8, MOST_ENTRIES + 1)),
        DEVICE => Some((8, MAX_DEVICES)),
        ROW => Some((8, MAX_DEVICES * MAX_HISTORY)),
        ROLE | DATABASE => Some((8, TOTALS_ROWS)),
        _ => None,
    }
}

/// Larger than any file pg_netstat writes (16 devices of full history: 221 MB, and a
/// million statement rows: 112 MB): such a file is not read at all.
pub const MAX_FILE_BYTES: u64 = 512 << 20;

/// Everything saved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedState {
    /// When it was written, Unix microseconds.
    pub saved_at_us: i64,
    /// The cluster's system identifier (pg_control): a file from another cluster is refused.
    pub system_identifier: u64,
    /// Written by a server in recovery (a standby). A file written by a primary and found
    /// on a standby came with a base backup: it describes another machine's traffic.
    pub in_recovery: bool,
    /// Written as the collector stopped (a clean shutdown, or the collector ended alone),
    /// not by a periodic save: nothing counted before the stop is missing from it.
    pub at_exit: bool,
    /// The pg_netstat version that wrote it.
    pub writer: String,
    /// The WAL timeline the writer was on (0: not known, a file from before this field).
    pub timeline: u32,
    pub devices: Vec<SavedDevice>,
    /// Role and database totals by row (row 0: no known owner, and overflow).
    pub roles: Vec<(u16, Totals)>,
    pub databases: Vec<(u16, Totals)>,
    pub flow_stats: FlowStats,
    /// The rows of pg_netstat_statements, and the statement table's counters.
    pub statements: Vec<Row>,
    pub statement_table: TableCounters,
    /// The captured egress totals by row (`peer::egress_row`).
    pub egress: Vec<(u8, Totals)>,
    /// The backends' totals per role, database, application, peer class and backend kind
    /// (ended and live connections alike, as the view shows them), and their counters.
    pub applications: Vec<AppRow>,
    pub application_table: AppTableCounters,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppTableCounters {
    pub stats_reset_us: i64,
    pub app_overflow: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedDevice {
    pub name: String,
    pub total: Counters,
    pub total_base: Counters,
    pub kernel_drops: u64,
    pub ring_freezes: u64,
    /// Closed intervals, oldest first.
    pub rows: Vec<Slot>,
}

/// The flow table's own counters that the views show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub stats_reset_us: i64,
    pub evictions: u64,
    pub folded: u64,
    pub owner_overflow: u64,
}

/// Why a file cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BadFile {
    Empty,
    NotOurs,
    Truncated { expected: u64, found: u64 },
    TooNew { format: u32, oldest_reader: u32 },
    Checksum { stored: u32, computed: u32 },
    Malformed(String),
}

impl fmt::Display for BadFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadFile::Empty => write!(f, "the file is empty"),
            BadFile::NotOurs => write!(f, "the file does not start with pg_netstat's signature (not a pg_netstat file)"),
            BadFile::Truncated { expected, found } => {
                write!(f, "the file is truncated: {found} bytes where its header promises {expected}")
            }
            BadFile::TooNew { format, oldest_reader } => write!(
                f,
                "the file has format {format}, readable only from format {oldest_reader} on; this pg_netstat reads format {FORMAT} and older"
            ),
            BadFile::Checksum { stored, computed } => {
                write!(f, "the checksum does not match (stored {stored:08x}, computed {computed:08x}): the file is corrupted")
            }
            BadFile::Malformed(why) => write!(f, "the file is malformed: {why}"),
        }
    }
}

const COUNTERS_LEN: usize = 32;
const TCP_LEN: usize = 88;
const META_LEN: usize = 32 + WRITER_LEN + 8;
const DEVICE_LEN: usize = DEVICE_NAME_LEN + 2 * COUNTERS_LEN + 16;
const ROW_LEN: usize = 16 + COUNTERS_LEN + 24 + TCP_LEN;
const TOTALS_LEN: usize = 8 + NAME_LEN + 8 + COUNTERS_LEN + TCP_LEN;
const FLOW_STATS_LEN: usize = 32;
const STATEMENT_LEN: usize = 24 + 9 * 8 + 16;
const STATEMENT_TABLE_LEN: usize = 24;
const EGRESS_LEN: usize = 8 + 8 + COUNTERS_LEN + TCP_LEN;
const APPLICATION_LEN: usize = 3 * NAME_LEN + 8 + 6 * 8;
const APPLICATION_TABLE_LEN: usize = 16;
/// Kind of the table-wide overflow row in a statement record.
const OVERFLOW_ROW: u32 = 4;

/// CRC-32 (IEEE 802.3, as zlib computes it) of the body.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}
