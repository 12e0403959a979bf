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
        flow_stats: FlowStats { stats_reset_us: 1_764_000_000_000_000, evictions: 3, folded: 11, owner_overflow: 1 },
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
        statement_table: TableCounters { evictions: 12, overflow_charges: 1, stats_reset_us: 1_764_000_000_000_000 },
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

/// `sections` copies of one section of `tag` with `count` records, each record the
/// first of that kind in a real file, in one file with its checksum made right.
fn repeated_section(tag: u32, record: &[u8], count: u32, sections: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..sections {
        for v in [tag, record.len() as u32, count] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        for _ in 0..count {
            body.extend_from_slice(record);
        }
    }
    let mut file = encode(&SavedState::default())[..HEADER_LEN].to_vec();
    file[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    file[24..28].copy_from_slice(&crc32(&body).to_le_bytes());
    file.extend_from_slice(&body);
    file
}

/// The first record of section `tag` in a real file.
fn a_real_record(tag: u32) -> Vec<u8> {
    let file = encode(&sample());
    let mut at = HEADER_LEN;
    loop {
        let word = |i: usize| u32::from_le_bytes(file[i..i + 4].try_into().unwrap()) as usize;
        let (t, len, count) = (word(at), word(at + 4), word(at + 8));
        if t as u32 == tag && count > 0 {
            return file[at + 12..at + 12 + len].to_vec();
        }
        at += 12 + len * count;
    }
}

/// The limits are the file's, not each section's: as many sections of one kind as it
/// takes to pass any limit are refused, where one section of them loads (issue 29: 17
/// one-device sections made 17 devices, over the most there can be).
#[test]
fn many_sections_of_one_kind_are_limited_as_one() {
    let device = a_real_record(DEVICE);
    assert_eq!(decode(&repeated_section(DEVICE, &device, 1, 1)).map(|s| s.devices.len()), Ok(1));
    assert_eq!(decode(&repeated_section(DEVICE, &device, 1, MAX_DEVICES)).map(|s| s.devices.len()), Ok(MAX_DEVICES));
    let too_many = decode(&repeated_section(DEVICE, &device, 1, MAX_DEVICES + 1));
    assert!(matches!(&too_many, Err(BadFile::Malformed(m)) if m.contains("17 records of kind 2")), "{too_many:?}");
    let role = a_real_record(ROLE);
    assert!(decode(&repeated_section(ROLE, &role, 128, 2)).is_ok());
    assert!(matches!(decode(&repeated_section(ROLE, &role, 128, 3)), Err(BadFile::Malformed(_))));
    // A file of the largest size read, made of sections each under its limit: refused at
    // the section that passes it, having decoded no more than one kind's limit.
    let statement = a_real_record(STATEMENT);
    let per_section = 100_000;
    let started = std::time::Instant::now();
    let big = repeated_section(STATEMENT, &statement, per_section, MOST_ENTRIES / per_section as usize + 1);
    assert!(matches!(decode(&big), Err(BadFile::Malformed(_))));
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
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
