"""The saved-state file's documented format (crates/core/src/savefile/), written independently of
the Rust encoder: the tests load what it writes to prove the format is what the docs say,
and scripts/bench writes full histories with it to time loading and saving."""

import struct
import zlib

STATEMENT_KINDS = {"statement": 1, "setup": 2, "other": 3, "overflow": 4}


def _section(tag, record_len, records):
    assert all(len(r) == record_len for r in records)
    return struct.pack("<III", tag, record_len, len(records)) + b"".join(records)


def statement_row(kind, userid=0, dbid=0, queryid=0, calls=0, bytes_in=0, bytes_out=0, segments_in=0,
                  segments_out=0, retransmits=0, rtt_sum_us=0, rtt_samples=0, rtt_max_us=0, first_seen_us=0,
                  last_seen_us=0):
    """One record of section 7 (a row of pg_netstat_statements; kind 'overflow' is the row
    with NULL role and database)."""
    return struct.pack("<IIIIQ9Qqq", STATEMENT_KINDS[kind], userid, dbid, 0, queryid, calls, bytes_in, bytes_out,
                       segments_in, segments_out, retransmits, rtt_sum_us, rtt_samples, rtt_max_us, first_seen_us,
                       last_seen_us)


def saved_file(system_identifier, devices, now, rows, timeline=1, statements=None, statement_table=(0, 0, 0)):
    """A file in which each device of `devices` has `rows` one-second intervals ending
    just before `now` (Unix seconds), one packet each way of 100 bytes per interval,
    written by a primary on `timeline` (a new cluster's is 1). With `statements` (records
    of `statement_row`) it is a format-2 file with the statement sections, the table's
    counters being `statement_table` (evictions, overflow_charges, stats_reset in Unix
    µs); without, a file of format 1, as the first release wrote."""
    meta = struct.pack("<qQQQ16sQ", now * 1_000_000, system_identifier, 0, 1, b"test", timeline)
    devs = [struct.pack("<16s10Q", d.encode(), rows, rows, rows * 100, rows * 100, 0, 0, 0, 0, 0, 0) for d in devices]
    slots = [struct.pack("<IIq4QQQq11Q", i, 1, now - rows + k, 1, 1, 100, 100, 0, 0,
                         (now - rows + k) * 1_000_000 + 1_500_000, *([0] * 11))
             for i in range(len(devices)) for k in range(rows)]
    body = _section(1, 56, [meta]) + _section(2, 96, devs) + _section(3, 160, slots)
    fmt = 1
    if statements is not None:
        body += _section(7, 112, list(statements)) + _section(8, 24, [struct.pack("<QQq", *statement_table)])
        fmt = 2
    return b"PGNETST\0" + struct.pack("<IIQII", fmt, 1, len(body), zlib.crc32(body), 0) + body
