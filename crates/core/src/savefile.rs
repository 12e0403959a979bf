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

// ---- encoding ----

struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn text(&mut self, s: &[u8], len: usize) {
        let n = s.len().min(len);
        self.0.extend_from_slice(&s[..n]);
        self.0.resize(self.0.len() + len - n, 0);
    }
    fn counters(&mut self, c: &Counters) {
        for v in [c.packets_in, c.packets_out, c.bytes_in, c.bytes_out] {
            self.u64(v);
        }
    }
    fn tcp(&mut self, t: &TcpCounters) {
        for v in tcp_fields(t) {
            self.u64(v);
        }
    }
    /// Writes a section of `count` records of `record_len` bytes, each by `one`.
    fn section<T>(&mut self, tag: u32, record_len: usize, items: &[T], mut one: impl FnMut(&mut Out, &T)) {
        self.u32(tag);
        self.u32(record_len as u32);
        self.u32(items.len() as u32);
        for it in items {
            let start = self.0.len();
            one(self, it);
            debug_assert_eq!(self.0.len() - start, record_len, "section {tag}: record length");
        }
    }
}

fn tcp_fields(t: &TcpCounters) -> [u64; 11] {
    [
        t.syn,
        t.fin_in,
        t.fin_out,
        t.rst_in,
        t.rst_out,
        t.retrans_in,
        t.retrans_out,
        t.zero_window_in,
        t.zero_window_out,
        t.ooo_in,
        t.ooo_out,
    ]
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

/// The file's bytes.
pub fn encode(s: &SavedState) -> Vec<u8> {
    let mut o = Out(Vec::with_capacity(
        HEADER_LEN
            + 256
            + s.devices.iter().map(|d| d.rows.len()).sum::<usize>() * ROW_LEN
            + (s.roles.len() + s.databases.len()) * TOTALS_LEN
            + s.statements.len() * STATEMENT_LEN,
    ));
    o.0.resize(HEADER_LEN, 0);
    o.section(META, META_LEN, &[s], |o, s| {
        o.i64(s.saved_at_us);
        o.u64(s.system_identifier);
        o.u64(s.in_recovery as u64);
        o.u64(s.at_exit as u64);
        o.text(s.writer.as_bytes(), WRITER_LEN);
        o.u64(s.timeline as u64);
    });
    o.section(DEVICE, DEVICE_LEN, &s.devices, |o, d| {
        o.text(d.name.as_bytes(), DEVICE_NAME_LEN);
        o.counters(&d.total);
        o.counters(&d.total_base);
        o.u64(d.kernel_drops);
        o.u64(d.ring_freezes);
    });
    let rows: Vec<(u32, &Slot)> =
        s.devices.iter().enumerate().flat_map(|(i, d)| d.rows.iter().map(move |r| (i as u32, r))).collect();
    o.section(ROW, ROW_LEN, &rows, |o, (device, r)| {
        o.u32(*device);
        o.u32(r.secs);
        o.i64(r.start);
        o.counters(&r.counters);
        o.u64(r.kernel_drops);
        o.u64(r.late);
        o.i64(r.created_at_us);
        o.tcp(&r.tcp);
    });
    for (tag, rows) in [(ROLE, &s.roles), (DATABASE, &s.databases)] {
        o.section(tag, TOTALS_LEN, rows, |o, (row, t)| {
            o.u32(*row as u32);
            o.u32(t.in_use as u32);
            o.text(&t.name, NAME_LEN);
            o.u64(t.connections);
            o.counters(&t.counters);
            o.tcp(&t.tcp);
        });
    }
    o.section(FLOW_STATS, FLOW_STATS_LEN, &[s.flow_stats], |o, f| {
        o.i64(f.stats_reset_us);
        o.u64(f.evictions);
        o.u64(f.folded);
        o.u64(f.owner_overflow);
    });
    o.section(STATEMENT, STATEMENT_LEN, &s.statements, |o, r| {
        match r.key {
            Some(k) => {
                o.u32(k.kind() as u32);
                o.u32(k.role);
                o.u32(k.database);
                o.u32(0);
                o.u64(k.queryid);
            }
            None => {
                o.u32(OVERFLOW_ROW);
                o.u32(0);
                o.u32(0);
                o.u32(0);
                o.u64(0);
            }
        }
        let f = &r.figures;
        for v in [
            f.calls,
            f.bytes_in,
            f.bytes_out,
            f.segs_in,
            f.segs_out,
            f.retrans,
            f.rtt_sum_us,
            f.rtt_samples,
            f.rtt_max_us,
        ] {
            o.u64(v);
        }
        o.i64(r.first_seen_us);
        o.i64(r.last_seen_us);
    });
    o.section(STATEMENT_TABLE, STATEMENT_TABLE_LEN, &[s.statement_table], |o, t| {
        o.u64(t.evictions);
        o.u64(t.overflow_charges);
        o.i64(t.stats_reset_us);
    });
    o.section(EGRESS, EGRESS_LEN, &s.egress, |o, (row, t)| {
        o.u32(*row as u32);
        o.u32(0);
        o.u64(t.connections);
        o.counters(&t.counters);
        o.tcp(&t.tcp);
    });
    o.section(APPLICATION, APPLICATION_LEN, &s.applications, |o, a| {
        o.text(&a.key.role, NAME_LEN);
        o.text(&a.key.database, NAME_LEN);
        o.text(&a.key.application, NAME_LEN);
        o.u32(a.key.peer_class as u32);
        o.u32(a.key.kind as u32);
        for v in [
            a.connections,
            a.socket.bytes_in,
            a.socket.bytes_out,
            a.socket.segments_in,
            a.socket.segments_out,
            a.socket.retransmits,
        ] {
            o.u64(v);
        }
    });
    o.section(APPLICATION_TABLE, APPLICATION_TABLE_LEN, &[s.application_table], |o, t| {
        o.i64(t.stats_reset_us);
        o.u64(t.app_overflow);
    });
    let body_len = (o.0.len() - HEADER_LEN) as u64;
    let crc = crc32(&o.0[HEADER_LEN..]);
    let mut h = Out(Vec::with_capacity(HEADER_LEN));
    h.0.extend_from_slice(&MAGIC);
    h.u32(FORMAT);
    h.u32(OLDEST_READER);
    h.u64(body_len);
    h.u32(crc);
    h.u32(0);
    o.0[..HEADER_LEN].copy_from_slice(&h.0);
    o.0
}

// ---- decoding ----

/// Reads a record's fields in order; a field past the record's end (written by an older
/// version, whose records were shorter) reads as 0.
struct In<'a> {
    b: &'a [u8],
    at: usize,
}

impl In<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.b.get(self.at..self.at + N) {
            out.copy_from_slice(src);
        }
        self.at += N;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
    fn counters(&mut self) -> Counters {
        Counters { packets_in: self.u64(), packets_out: self.u64(), bytes_in: self.u64(), bytes_out: self.u64() }
    }
    fn tcp(&mut self) -> TcpCounters {
        TcpCounters {
            syn: self.u64(),
            fin_in: self.u64(),
            fin_out: self.u64(),
            rst_in: self.u64(),
            rst_out: self.u64(),
            retrans_in: self.u64(),
            retrans_out: self.u64(),
            zero_window_in: self.u64(),
            zero_window_out: self.u64(),
            ooo_in: self.u64(),
            ooo_out: self.u64(),
        }
    }
}

fn text(bytes: &[u8]) -> Result<String, BadFile> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end])
        .map(str::to_string)
        .map_err(|_| BadFile::Malformed("a name is not valid UTF-8".into()))
}

/// Reads a file's bytes.
pub fn decode(bytes: &[u8]) -> Result<SavedState, BadFile> {
    if bytes.is_empty() {
        return Err(BadFile::Empty);
    }
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(BadFile::NotOurs);
    }
    if bytes.len() < HEADER_LEN {
        return Err(BadFile::Truncated { expected: HEADER_LEN as u64, found: bytes.len() as u64 });
    }
    let mut h = In { b: &bytes[..HEADER_LEN], at: MAGIC.len() };
    let (format, oldest_reader, body_len, stored) = (h.u32(), h.u32(), h.u64(), h.u32());
    if oldest_reader > FORMAT {
        return Err(BadFile::TooNew { format, oldest_reader });
    }
    let expected = HEADER_LEN as u64 + body_len;
    if (bytes.len() as u64) < expected {
        return Err(BadFile::Truncated { expected, found: bytes.len() as u64 });
    }
    if (bytes.len() as u64) > expected {
        return Err(BadFile::Malformed(format!(
            "{} bytes after the end its header gives",
            bytes.len() as u64 - expected
        )));
    }
    let body = &bytes[HEADER_LEN..];
    let computed = crc32(body);
    if computed != stored {
        return Err(BadFile::Checksum { stored, computed });
    }

    let mut s = SavedState::default();
    let mut row_device: Vec<u32> = Vec::new();
    let mut rows: Vec<Slot> = Vec::new();
    let mut at = 0usize;
    while at < body.len() {
        let mut sh = In { b: body.get(at..at + SECTION_HEADER_LEN).unwrap_or(&[]), at: 0 };
        if body.len() - at < SECTION_HEADER_LEN {
            return Err(BadFile::Malformed(format!("a section header cut short at byte {}", HEADER_LEN + at)));
        }
        let (tag, record_len, count) = (sh.u32(), sh.u32() as usize, sh.u32() as usize);
        at += SECTION_HEADER_LEN;
        if let Some((min_len, max_count)) = limits(tag) {
            if count > 0 && record_len < min_len {
                return Err(BadFile::Malformed(format!("section {tag} has records of {record_len} bytes")));
            }
            if count > max_count {
                return Err(BadFile::Malformed(format!(
                    "section {tag} has {count} records, more than the {max_count} that can exist"
                )));
            }
        }
        let len = record_len
            .checked_mul(count)
            .filter(|n| *n <= body.len() - at)
            .ok_or_else(|| BadFile::Malformed(format!("section {tag} claims {count} records of {record_len} bytes")))?;
        let data = &body[at..at + len];
        at += len;
        let records = (0..count).map(|i| In { b: &data[i * record_len..(i + 1) * record_len], at: 0 });
        match tag {
            META => {
                for mut r in records {
                    s.saved_at_us = r.i64();
                    s.system_identifier = r.u64();
                    s.in_recovery = r.u64() != 0;
                    s.at_exit = r.u64() != 0;
                    s.writer = text(&r.take::<WRITER_LEN>())?;
                    s.timeline = r.u64() as u32;
                }
            }
            DEVICE => {
                for mut r in records {
                    let name = text(&r.take::<DEVICE_NAME_LEN>())?;
                    if !valid_device_name(&name) {
                        return Err(BadFile::Malformed(format!("{name:?} is not a device name")));
                    }
                    s.devices.push(SavedDevice {
                        name,
                        total: r.counters(),
                        total_base: r.counters(),
                        kernel_drops: r.u64(),
                        ring_freezes: r.u64(),
                        rows: Vec::new(),
                    });
                }
            }
            ROW => {
                for mut r in records {
                    row_device.push(r.u32());
                    let secs = r.u32();
                    rows.push(Slot {
                        secs,
                        start: r.i64(),
                        counters: r.counters(),
                        kernel_drops: r.u64(),
                        late: r.u64(),
                        created_at_us: r.i64(),
                        tcp: r.tcp(),
                    });
                }
            }
            ROLE | DATABASE => {
                let mut out = Vec::new();
                for mut r in records {
                    let row = r.u32();
                    let row = u16::try_from(row).map_err(|_| BadFile::Malformed(format!("totals row {row}")))?;
                    let in_use = r.u32() != 0;
                    let name = r.take::<NAME_LEN>();
                    out.push((
                        row,
                        Totals { in_use, name, connections: r.u64(), counters: r.counters(), tcp: r.tcp() },
                    ));
                }
                if tag == ROLE {
                    s.roles = out;
                } else {
                    s.databases = out;
                }
            }
            FLOW_STATS => {
                for mut r in records {
                    s.flow_stats = FlowStats {
                        stats_reset_us: r.i64(),
                        evictions: r.u64(),
                        folded: r.u64(),
                        owner_overflow: r.u64(),
                    };
                }
            }
            STATEMENT => {
                s.statements.reserve(count);
                for mut r in records {
                    let (kind, role, database, _) = (r.u32(), r.u32(), r.u32(), r.u32());
                    let queryid = r.u64();
                    let key = match kind {
                        1 => Some(StmtKey::new(Kind::Statement, role, database, queryid)),
                        2 => Some(StmtKey::new(Kind::Setup, role, database, queryid)),
                        3 => Some(StmtKey::new(Kind::Other, role, database, queryid)),
                        OVERFLOW_ROW => None,
                        _ => return Err(BadFile::Malformed(format!("a statement row of kind {kind}"))),
                    };
                    let figures = Figures {
                        calls: r.u64(),
                        bytes_in: r.u64(),
                        bytes_out: r.u64(),
                        segs_in: r.u64(),
                        segs_out: r.u64(),
                        retrans: r.u64(),
                        rtt_sum_us: r.u64(),
                        rtt_samples: r.u64(),
                        rtt_max_us: r.u64(),
                    };
                    s.statements.push(Row { key, figures, first_seen_us: r.i64(), last_seen_us: r.i64() });
                }
            }
            STATEMENT_TABLE => {
                for mut r in records {
                    s.statement_table =
                        TableCounters { evictions: r.u64(), overflow_charges: r.u64(), stats_reset_us: r.i64() };
                }
            }
            EGRESS => {
                for mut r in records {
                    let row = r.u32();
                    let _ = r.u32();
                    if row as usize >= EGRESS_ROWS {
                        return Err(BadFile::Malformed(format!("egress row {row}")));
                    }
                    let t = Totals {
                        in_use: true,
                        connections: r.u64(),
                        counters: r.counters(),
                        tcp: r.tcp(),
                        ..Totals::default()
                    };
                    s.egress.push((row as u8, t));
                }
            }
            APPLICATION => {
                for mut r in records {
                    let (role, database, application) =
                        (r.take::<NAME_LEN>(), r.take::<NAME_LEN>(), r.take::<NAME_LEN>());
                    let (peer_class, kind) = (r.u32(), r.u32());
                    if peer_class as usize >= PEER_CLASSES.len() || kind as usize >= BACKEND_KINDS.len() {
                        return Err(BadFile::Malformed(format!(
                            "an application row of class {peer_class}, kind {kind}"
                        )));
                    }
                    let key = AppKey { role, database, application, peer_class: peer_class as u8, kind: kind as u8 };
                    let connections = r.u64();
                    let socket = Socket {
                        bytes_in: r.u64(),
                        bytes_out: r.u64(),
                        segments_in: r.u64(),
                        segments_out: r.u64(),
                        retransmits: r.u64(),
                        rtt_us: 0,
                    };
                    s.applications.push(AppRow { in_use: true, key, connections, socket });
                }
            }
            APPLICATION_TABLE => {
                for mut r in records {
                    s.application_table = AppTableCounters { stats_reset_us: r.i64(), app_overflow: r.u64() };
                }
            }
            _ => {} // a later version's section: not ours to read
        }
    }
    // Rows follow the devices section in the file, but need not: attach them at the end.
    for (device, row) in row_device.into_iter().zip(rows) {
        let d = s.devices.get_mut(device as usize).ok_or_else(|| {
            BadFile::Malformed(format!("an interval of device {device}, which the file does not list"))
        })?;
        d.rows.push(row);
    }
    check_values(&s)?;
    Ok(s)
}

/// The latest second a saved moment may name: 9999-12-31 23:59:59 UTC. Moments are
/// checked against it (and against the epoch) before anything computes with them: a
/// start in microseconds then fits an i64 with room to spare.
pub const LATEST_UNIX_S: i64 = 253_402_300_799;
const LATEST_UNIX_US: i64 = LATEST_UNIX_S * 1_000_000 + 999_999;
/// The longest interval a row can have: pg_netstat.interval's maximum.
pub const LONGEST_INTERVAL_S: u32 = 900_000;

/// Every moment and interval length the file gives is one pg_netstat could have written.
/// (Counts are not bounded: any u64 is a count; they wrap, as counters do.)
fn check_values(s: &SavedState) -> Result<(), BadFile> {
    let moment = |what: &str, us: i64| {
        if (0..=LATEST_UNIX_US).contains(&us) {
            Ok(())
        } else {
            Err(BadFile::Malformed(format!("{what} at {us} µs since 1970, which is no moment pg_netstat writes")))
        }
    };
    moment("the save", s.saved_at_us)?;
    for d in &s.devices {
        for r in &d.rows {
            if !(1..=LONGEST_INTERVAL_S).contains(&r.secs) {
                return Err(BadFile::Malformed(format!("an interval of {} seconds on {:?}", r.secs, d.name)));
            }
            if !(0..=LATEST_UNIX_S).contains(&r.start) {
                return Err(BadFile::Malformed(format!(
                    "an interval starting {} s since 1970 on {:?}",
                    r.start, d.name
                )));
            }
            moment("an interval's publication", r.created_at_us)?;
        }
    }
    moment("the flows' last reset", s.flow_stats.stats_reset_us)?;
    moment("the statement table's last reset", s.statement_table.stats_reset_us)?;
    moment("the applications' last reset", s.application_table.stats_reset_us)?;
    for r in &s.statements {
        moment("a statement's first charge", r.first_seen_us)?;
        moment("a statement's last charge", r.last_seen_us)?;
    }
    Ok(())
}

/// CRC-32 (IEEE 802.3, as zlib computes it).
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !bytes.iter().fold(!0u32, |c, b| TABLE[((c ^ *b as u32) & 0xff) as usize] ^ (c >> 8))
}

// ---- files ----

/// Replaces `dir/name` with `bytes` so that a crash at any moment leaves either the old
/// file or the new one whole: a temporary file, fsync, rename, fsync of the directory.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dir.join(name))?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads `path`: `Ok(None)` when there is no file. A file larger than `MAX_FILE_BYTES`
/// is an error, not read.
pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return Err(io::Error::other(format!("it is {} bytes, larger than any file pg_netstat writes", m.len())))
        }
        Ok(_) => {}
    }
    fs::read(path).map(Some)
}

/// Files set aside that are kept: the newest; older ones are removed, so a file that
/// keeps going bad cannot fill the disk (nor every base backup).
const KEEP_SET_ASIDE: usize = 3;

/// Moves a file that could not be loaded out of the way, keeping it for a look:
/// `pg_netstat.stat` becomes `pg_netstat.stat.bad-<unix seconds>`; of those, the newest
/// `KEEP_SET_ASIDE` are kept.
pub fn set_aside(path: &Path, now_s: i64) -> io::Result<PathBuf> {
    let mut to = path.as_os_str().to_owned();
    to.push(format!(".bad-{now_s}"));
    let to = PathBuf::from(to);
    fs::rename(path, &to)?;
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let prefix = format!("{name}.bad-");
        let mut aside: Vec<(i64, PathBuf)> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let when = e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok()?;
                Some((when, e.path()))
            })
            .collect();
        aside.sort();
        for (_, old) in aside.iter().rev().skip(KEEP_SET_ASIDE) {
            let _ = fs::remove_file(old);
        }
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::name_bytes;

    fn sample() -> SavedState {
        let slot = |start: i64, n: u64| Slot {
            start,
            secs: 10,
            counters: Counters { packets_in: n, packets_out: n + 1, bytes_in: 100 * n, bytes_out: 200 * n },
            kernel_drops: 3,
            late: 2,
            created_at_us: start * 1_000_000 + 5_000_123,
            tcp: TcpCounters { syn: 1, retrans_out: 4, ooo_in: 7, ..TcpCounters::default() },
        };
        let totals = |name: &str, n: u64| Totals {
            in_use: true,
            name: name_bytes(name.as_bytes()),
            connections: n,
            counters: Counters { packets_in: n, packets_out: 2 * n, bytes_in: 3 * n, bytes_out: 4 * n },
            tcp: TcpCounters { fin_in: n, rst_out: 1, ..TcpCounters::default() },
        };
        SavedState {
            saved_at_us: 1_764_650_000_123_456,
            system_identifier: 7_301_234_567_890_123_456,
            in_recovery: false,
            at_exit: true,
            writer: "0.2.0".into(),
            timeline: 3,
            devices: vec![
                SavedDevice {
                    name: "lo".into(),
                    total: Counters { packets_in: 9, packets_out: 8, bytes_in: 7, bytes_out: 6 },
                    total_base: Counters { packets_in: 1, ..Counters::default() },
                    kernel_drops: 12,
                    ring_freezes: 2,
                    rows: vec![slot(1_764_649_990, 5), slot(1_764_650_000, 6)],
                },
                SavedDevice { name: "veth0".into(), rows: vec![slot(1_764_650_000, 1)], ..SavedDevice::default() },
            ],
            roles: vec![(0, totals("", 2)), (1, totals("app", 5)), (7, totals("report", 9))],
            databases: vec![(1, totals("shop", 14))],
            flow_stats: FlowStats {
                stats_reset_us: 1_764_000_000_000_000,
                evictions: 3,
                folded: 11,
                owner_overflow: 1,
            },
            statements: vec![
                Row {
                    key: Some(StmtKey::new(Kind::Statement, 16384, 5, 0x8000_0000_0000_0001)),
                    figures: Figures {
                        calls: 3,
                        bytes_in: 120,
                        bytes_out: 3_000_000,
                        segs_in: 3,
                        segs_out: 70,
                        retrans: 2,
                        rtt_sum_us: 150,
                        rtt_samples: 3,
                        rtt_max_us: 90,
                    },
                    first_seen_us: 1_764_649_000_000_001,
                    last_seen_us: 1_764_649_999_000_002,
                },
                Row {
                    key: Some(StmtKey::new(Kind::Setup, 16384, 5, 0)),
                    figures: Figures { calls: 1, bytes_in: 300, bytes_out: 400, ..Figures::default() },
                    first_seen_us: 1_764_649_000_000_000,
                    last_seen_us: 1_764_649_000_000_000,
                },
                Row {
                    key: Some(StmtKey::new(Kind::Other, 10, 1, 0)),
                    figures: Figures { calls: 9, bytes_out: 77, ..Figures::default() },
                    first_seen_us: 5,
                    last_seen_us: 6,
                },
                Row {
                    key: None,
                    figures: Figures { calls: 1, bytes_in: 1, ..Figures::default() },
                    first_seen_us: 7,
                    last_seen_us: 8,
                },
            ],
            statement_table: TableCounters {
                evictions: 12,
                overflow_charges: 1,
                stats_reset_us: 1_764_000_000_000_000,
            },
            egress: vec![(0, totals("", 3)), (11, totals("", 8))],
            applications: vec![
                AppRow {
                    in_use: true,
                    key: AppKey {
                        role: name_bytes(b"app"),
                        database: name_bytes(b"shop"),
                        application: name_bytes(b"storefront"),
                        peer_class: 3,
                        kind: 1,
                    },
                    connections: 200,
                    socket: Socket {
                        bytes_in: 1,
                        bytes_out: 2,
                        segments_in: 3,
                        segments_out: 4,
                        retransmits: 5,
                        rtt_us: 0,
                    },
                },
                AppRow { in_use: true, connections: 1, ..AppRow::default() },
            ],
            application_table: AppTableCounters { stats_reset_us: 9, app_overflow: 1 },
        }
    }

    /// Without the sections that came after the first release (what its reader keeps).
    fn without_later_sections(s: SavedState) -> SavedState {
        SavedState {
            statements: vec![],
            statement_table: TableCounters::default(),
            egress: vec![],
            applications: vec![],
            application_table: AppTableCounters::default(),
            ..s
        }
    }

    fn later_section(t: u32) -> bool {
        (STATEMENT..=APPLICATION_TABLE).contains(&t)
    }

    /// `file` with each section's tag mapped by `tag` (`None`: the section left out), and
    /// the header's format set to `format`, length and checksum made right.
    fn resectioned(file: &[u8], tag: impl Fn(u32) -> Option<u32>, format: u32) -> Vec<u8> {
        let mut body = Vec::new();
        let mut at = HEADER_LEN;
        while at < file.len() {
            let h = |i: usize| u32::from_le_bytes(file[at + i..at + i + 4].try_into().unwrap());
            let end = at + SECTION_HEADER_LEN + h(4) as usize * h(8) as usize;
            if let Some(t) = tag(h(0)) {
                body.extend_from_slice(&t.to_le_bytes());
                body.extend_from_slice(&file[at + 4..end]);
            }
            at = end;
        }
        let mut out = Vec::from(&file[..HEADER_LEN]);
        out[8..12].copy_from_slice(&format.to_le_bytes());
        out[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        out[24..28].copy_from_slice(&crc32(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// The statement sections are new in format 2, and readers of format 1 (which know
    /// sections 1 to 6 and skip the others) must still read everything else: the file
    /// still says it is readable from format 1 on, and the same file with the statement
    /// sections' tags unknown to the reader reads as the state without statements.
    #[test]
    fn a_reader_of_format_1_skips_the_statement_sections() {
        let s = sample();
        let file = encode(&s);
        assert_eq!(u32::from_le_bytes(file[8..12].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(file[12..16].try_into().unwrap()), 1, "oldest reader");
        let unknown = |t: u32| Some(if later_section(t) { t + 1000 } else { t });
        let as_v1_sees_it = decode(&resectioned(&file, unknown, FORMAT)).unwrap();
        assert_eq!(as_v1_sees_it, without_later_sections(s));
    }

    /// A file of format 1 (no statement sections) reads with no statement rows.
    #[test]
    fn a_format_1_file_reads_with_no_statements() {
        let s = sample();
        let old = |t: u32| (!later_section(t)).then_some(t);
        let state = decode(&resectioned(&encode(&s), old, 1)).unwrap();
        assert_eq!(state, without_later_sections(s));
    }

    #[test]
    fn an_egress_row_or_application_key_out_of_range_is_malformed() {
        let s = sample();
        for (section, at, value) in
            [(EGRESS, 0, EGRESS_ROWS as u32), (APPLICATION, 3 * NAME_LEN, 4), (APPLICATION, 3 * NAME_LEN + 4, 3)]
        {
            let bad = |tag: u32, r: &[u8]| {
                let mut r = r.to_vec();
                if tag == section {
                    r[at..at + 4].copy_from_slice(&value.to_le_bytes());
                }
                r
            };
            assert!(
                matches!(decode(&rewritten(&encode(&s), bad, &[], FORMAT)), Err(BadFile::Malformed(_))),
                "{section} {at}"
            );
        }
    }

    #[test]
    fn a_statement_row_of_an_unknown_kind_is_malformed() {
        let s = SavedState { statements: vec![Row::default()], ..SavedState::default() }; // key of kind 1
        let kind5 = |tag: u32, r: &[u8]| {
            if tag == STATEMENT {
                [&5u32.to_le_bytes()[..], &r[4..]].concat()
            } else {
                r.to_vec()
            }
        };
        assert!(matches!(decode(&rewritten(&encode(&s), kind5, &[], FORMAT)), Err(BadFile::Malformed(_))));
        let kind4 = |tag: u32, r: &[u8]| {
            if tag == STATEMENT {
                [&4u32.to_le_bytes()[..], &r[4..]].concat()
            } else {
                r.to_vec()
            }
        };
        assert_eq!(decode(&rewritten(&encode(&s), kind4, &[], FORMAT)).unwrap().statements[0].key, None);
    }

    #[test]
    fn what_is_written_is_read_back_whole() {
        let s = sample();
        assert_eq!(decode(&encode(&s)), Ok(s));
        assert_eq!(decode(&encode(&SavedState::default())), Ok(SavedState::default()));
    }

    #[test]
    fn an_empty_file_a_foreign_file_and_a_cut_file_are_refused_each_with_its_reason() {
        let bytes = encode(&sample());
        assert_eq!(decode(&[]), Err(BadFile::Empty));
        assert_eq!(decode(b"PGDMP\x01\x0e\x00 some other program's file"), Err(BadFile::NotOurs));
        for cut in [10, HEADER_LEN, bytes.len() / 2, bytes.len() - 1] {
            assert!(matches!(decode(&bytes[..cut]), Err(BadFile::Truncated { .. })), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(BadFile::Malformed(_))));
    }

    #[test]
    fn any_flipped_bit_in_the_body_is_caught_by_the_checksum() {
        let bytes = encode(&sample());
        for at in (HEADER_LEN..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(matches!(decode(&bad), Err(BadFile::Checksum { .. })), "flip at {at}");
        }
    }

    #[test]
    fn a_file_an_older_reader_would_misread_is_refused_as_too_new() {
        let mut bytes = encode(&sample());
        bytes[12..16].copy_from_slice(&(FORMAT + 1).to_le_bytes()); // oldest_reader
        bytes[8..12].copy_from_slice(&(FORMAT + 1).to_le_bytes());
        assert_eq!(decode(&bytes), Err(BadFile::TooNew { format: FORMAT + 1, oldest_reader: FORMAT + 1 }));
    }

    /// `file` with each record rewritten by `record(tag, bytes)` (every record of a section
    /// must come out the same length), `extra` appended to the body, and the header's
    /// format set to `format`, length and checksum made right.
    fn rewritten(file: &[u8], record: impl Fn(u32, &[u8]) -> Vec<u8>, extra: &[u8], format: u32) -> Vec<u8> {
        let mut body = Vec::new();
        let mut at = HEADER_LEN;
        while at < file.len() {
            let h = |i: usize| u32::from_le_bytes(file[at + i..at + i + 4].try_into().unwrap());
            let (tag, len, count) = (h(0), h(4) as usize, h(8) as usize);
            let records: Vec<Vec<u8>> = (0..count)
                .map(|i| record(tag, &file[at + SECTION_HEADER_LEN + i * len..at + SECTION_HEADER_LEN + (i + 1) * len]))
                .collect();
            let new_len = records.first().map_or(len, Vec::len);
            for v in [tag, new_len as u32, count as u32] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            records.iter().for_each(|r| body.extend_from_slice(r));
            at += SECTION_HEADER_LEN + len * count;
        }
        body.extend_from_slice(extra);
        let mut out = Vec::from(&file[..HEADER_LEN]);
        out[8..12].copy_from_slice(&format.to_le_bytes());
        out[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        out[24..28].copy_from_slice(&crc32(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A later version that appends a field to each record and adds a section of its own
    /// (as the per-statement table will): this version still reads what it knows.
    #[test]
    fn a_later_compatible_layout_is_read() {
        let s = sample();
        let longer = |_tag: u32, r: &[u8]| [r, &0xdead_beef_u64.to_le_bytes()].concat();
        let mut new_section = Vec::new();
        for v in [99u32, 8, 1] {
            new_section.extend_from_slice(&v.to_le_bytes()); // tag 99: 1 record of 8 bytes
        }
        new_section.extend_from_slice(&0xabcd_u64.to_le_bytes());
        // Newer format, same oldest reader.
        let file = rewritten(&encode(&s), longer, &new_section, FORMAT + 1);
        assert_eq!(decode(&file), Ok(s));
    }

    /// An older version's shorter records: the fields it did not have read as 0.
    #[test]
    fn an_older_shorter_record_reads_its_missing_fields_as_zero() {
        let s = SavedState {
            devices: vec![SavedDevice { name: "eth0".into(), kernel_drops: 5, ring_freezes: 6, ..Default::default() }],
            ..SavedState::default()
        };
        // Without the last field (ring_freezes) of the device record.
        let shorter = |tag: u32, r: &[u8]| if tag == DEVICE { r[..r.len() - 8].to_vec() } else { r.to_vec() };
        let file = rewritten(&encode(&s), shorter, &[], FORMAT);
        let d = &decode(&file).unwrap().devices[0];
        assert_eq!((d.name.as_str(), d.kernel_drops, d.ring_freezes), ("eth0", 5, 0));
    }

    #[test]
    fn a_section_claiming_more_than_the_file_holds_is_malformed_not_a_panic() {
        let mut body = Vec::new();
        for v in [ROW, ROW_LEN as u32, u32::MAX] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let mut file = encode(&SavedState::default())[..HEADER_LEN].to_vec();
        file[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        file[24..28].copy_from_slice(&crc32(&body).to_le_bytes());
        file.extend_from_slice(&body);
        assert!(matches!(decode(&file), Err(BadFile::Malformed(_))));
    }

    /// A file with one section `tag` of `count` records of `record_len` zero bytes (the
    /// records themselves only when `count * record_len` is small), checksum made right.
    fn one_section(tag: u32, record_len: u32, count: u32) -> Vec<u8> {
        let mut body = Vec::new();
        for v in [tag, record_len, count] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.resize(body.len() + (record_len as usize * count as usize).min(1 << 20), 0);
        let mut file = encode(&SavedState::default())[..HEADER_LEN].to_vec();
        file[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        file[24..28].copy_from_slice(&crc32(&body).to_le_bytes());
        file.extend_from_slice(&body);
        file
    }

    /// A hostile file (the checksum is no defence: anyone can compute it) must be refused
    /// quickly and without large allocations: empty records by the billion, more records
    /// of a kind than can exist, records too short to hold their fields.
    #[test]
    fn hostile_counts_and_record_lengths_are_refused_quickly() {
        let started = std::time::Instant::now();
        for (tag, len, count) in [
            (FLOW_STATS, 0, u32::MAX),
            (ROLE, 0, u32::MAX),
            (ROW, 1, 1 << 20),
            (DEVICE, DEVICE_LEN as u32, 17),
            (META, META_LEN as u32, 2),
            (ROLE, TOTALS_LEN as u32, TOTALS_ROWS as u32 + 1),
            (STATEMENT, 0, u32::MAX),
            (STATEMENT, STATEMENT_LEN as u32, MOST_ENTRIES as u32 + 2),
            (STATEMENT_TABLE, STATEMENT_TABLE_LEN as u32, 2),
        ] {
            assert!(matches!(decode(&one_section(tag, len, count)), Err(BadFile::Malformed(_))), "{tag} {len} {count}");
        }
        // An unknown section may hold anything; empty records of it cost nothing.
        assert!(decode(&one_section(99, 0, u32::MAX)).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    /// A crafted file passes the checksum: the same bytes with the checksum made again.
    fn resealed(mut file: Vec<u8>) -> Vec<u8> {
        if file.len() >= HEADER_LEN {
            let crc = crc32(&file[HEADER_LEN..]);
            file[24..28].copy_from_slice(&crc.to_le_bytes());
        }
        file
    }

    /// What the views and the worker compute with a loaded state cannot overflow.
    fn usable(s: &SavedState) {
        for r in s.devices.iter().flat_map(|d| &d.rows) {
            assert!(r.secs >= 1 && r.start.checked_mul(1_000_000).is_some(), "{r:?}");
            assert!(r.start.checked_add(r.secs as i64).is_some() && r.created_at_us >= 0, "{r:?}");
        }
        for us in [s.saved_at_us, s.flow_stats.stats_reset_us, s.statement_table.stats_reset_us]
            .into_iter()
            .chain(s.statements.iter().flat_map(|r| [r.first_seen_us, r.last_seen_us]))
        {
            assert!((0..=LATEST_UNIX_US).contains(&us), "{us}");
        }
    }

    #[test]
    fn moments_and_interval_lengths_no_writer_makes_are_malformed() {
        type Change = fn(&mut SavedState);
        let cases: [(&str, Change); 6] = [
            ("an interval starting", |s| s.devices[0].rows[0].start = i64::MAX / 1000),
            ("an interval of 0 seconds", |s| s.devices[0].rows[0].secs = 0),
            ("an interval's publication", |s| s.devices[0].rows[0].created_at_us = -1),
            ("the save", |s| s.saved_at_us = i64::MIN),
            ("a statement's first charge", |s| s.statements[0].first_seen_us = LATEST_UNIX_US + 1),
            ("the flows' last reset", |s| s.flow_stats.stats_reset_us = -5),
        ];
        for (what, change) in cases {
            let mut s = sample();
            change(&mut s);
            match decode(&encode(&s)) {
                Err(BadFile::Malformed(m)) => assert!(m.contains(what), "{what}: {m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    /// Every byte of a real file, changed to each of several values and sealed with a
    /// good checksum again, loads or is refused; it never panics (tests build with
    /// overflow checks), and what loads can be computed with.
    #[test]
    fn every_byte_of_a_real_file_changed_and_resealed_loads_or_is_refused() {
        let file = encode(&sample());
        let (mut loaded, mut refused) = (0, 0);
        for at in 0..file.len() {
            for v in [0x00, 0xff, 0x80, 0x7f, file[at] ^ 0x01, file[at].wrapping_add(0x40)] {
                let mut f = file.clone();
                f[at] = v;
                match decode(&resealed(f)) {
                    Ok(s) => {
                        usable(&s);
                        loaded += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(loaded > 0 && refused > 0, "{loaded} loaded, {refused} refused");
    }

    /// Random bytes after a real header, sealed: refused or loaded, never a panic.
    #[test]
    fn random_files_are_refused_or_loaded_never_a_panic() {
        let head = &encode(&sample())[..HEADER_LEN];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 600) as usize;
            let mut f = head.to_vec();
            f.extend((0..len).map(|_| next() as u8));
            f[16..24].copy_from_slice(&(len as u64).to_le_bytes());
            if let Ok(s) = decode(&resealed(f)) {
                usable(&s);
            }
        }
    }

    #[test]
    fn a_device_name_that_is_not_a_device_name_is_malformed() {
        let s = SavedState {
            devices: vec![SavedDevice { name: "bad name".into(), ..Default::default() }],
            ..Default::default()
        };
        assert!(matches!(decode(&encode(&s)), Err(BadFile::Malformed(_))));
    }

    #[test]
    fn crc32_is_the_standard_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn written_atomically_read_back_and_set_aside() {
        let dir = std::env::temp_dir().join(format!("pg_netstat-savefile-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        assert_eq!(read(&path).unwrap(), None);
        write_atomically(&dir, FILE_NAME, b"one").unwrap();
        write_atomically(&dir, FILE_NAME, b"two").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"two"[..]));
        assert!(!dir.join(format!("{FILE_NAME}.tmp")).exists());
        let aside = set_aside(&path, 1234).unwrap();
        assert_eq!(aside.file_name().unwrap(), "pg_netstat.stat.bad-1234");
        assert!(!path.exists() && aside.exists());
        // Only the newest few are kept.
        for t in [1300, 1200, 1500, 1400] {
            write_atomically(&dir, FILE_NAME, b"bad").unwrap();
            set_aside(&path, t).unwrap();
        }
        let mut left: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["pg_netstat.stat.bad-1300", "pg_netstat.stat.bad-1400", "pg_netstat.stat.bad-1500"]);
        // A directory that cannot be written: an error, and no temporary file left behind.
        assert!(write_atomically(&dir.join("missing"), FILE_NAME, b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
