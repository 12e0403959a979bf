"""The saved-state file's documented format (src/savefile.rs), written independently of
the Rust encoder: the tests load what it writes to prove the format is what the docs say,
and scripts/bench writes full histories with it to time loading and saving."""

import struct
import zlib


def _section(tag, record_len, records):
    assert all(len(r) == record_len for r in records)
    return struct.pack("<III", tag, record_len, len(records)) + b"".join(records)


def saved_file(system_identifier, devices, now, rows, timeline=1):
    """A file in which each device of `devices` has `rows` one-second intervals ending
    just before `now` (Unix seconds), one packet each way of 100 bytes per interval,
    written by a primary on `timeline` (a new cluster's is 1)."""
    meta = struct.pack("<qQQQ16sQ", now * 1_000_000, system_identifier, 0, 1, b"test", timeline)
    devs = [struct.pack("<16s10Q", d.encode(), rows, rows, rows * 100, rows * 100, 0, 0, 0, 0, 0, 0) for d in devices]
    slots = [struct.pack("<IIq4QQQq11Q", i, 1, now - rows + k, 1, 1, 100, 100, 0, 0,
                         (now - rows + k) * 1_000_000 + 1_500_000, *([0] * 11))
             for i in range(len(devices)) for k in range(rows)]
    body = _section(1, 56, [meta]) + _section(2, 96, devs) + _section(3, 160, slots)
    return b"PGNETST\0" + struct.pack("<IIQII", 1, 1, len(body), zlib.crc32(body), 0) + body
