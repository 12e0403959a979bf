//! A `SavedState` from a file's bytes, every length, count and value checked first.

use super::*;

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
    // Records of each known kind so far: the limits hold for the file, not per section
    // (a file of many one-record sections must not pass where one section would not).
    let mut seen = [0usize; 16];
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
            let total = &mut seen[tag as usize % 16];
            *total = total.saturating_add(count);
            if *total > max_count {
                return Err(BadFile::Malformed(format!(
                    "it holds {} records of kind {tag}, more than the {max_count} that can exist",
                    *total
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
pub(super) const LATEST_UNIX_US: i64 = LATEST_UNIX_S * 1_000_000 + 999_999;
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
