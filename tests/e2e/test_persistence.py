"""What was counted survives a restart (issue 13): saved at a clean shutdown and every
pg_netstat.save_interval to pg_stat/pg_netstat.stat, loaded at the next start. A crash
keeps what the last periodic save held; bad files are set aside with one log line and the
server starts counting afresh; pg_netstat.history sizes the history in shared memory.
pg_netstat_statements is saved too (issue 14), and a table made smaller than the saved
one folds the surplus into 'other' rows. Each test runs its own server, since each
restarts it."""

import os
import re
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from conftest import CAPTURE_METHOD
from harness import PGBIN, Cluster, SqlError, free_port, quiesce, run, wait_for
from savefile_format import saved_file as saved_file_bytes
from savefile_format import statement_row

ROOT = Path(__file__).resolve().parents[2]

BASE_CONF = ["pg_netstat.interval = 1", "pg_netstat.packet_wait_time = 1", "pg_netstat.pcap_timeout = 100",
             "pg_netstat.devices = 'lo'", "pg_netstat.capture_loopback = on",
             f"pg_netstat.capture_method = {CAPTURE_METHOD}"]
# Ten minutes of 1-second rows: none of a test's rows rotates out while it runs.
CONF = BASE_CONF + ["pg_netstat.history = 600"]
HISTORY = "SELECT * FROM pg_netstat_intervals ORDER BY device, ts"
SYSID = {}  # port -> the cluster's system identifier
DEVICES = ("SELECT device, packets_in, packets_out, bytes_in, bytes_out, kernel_drops, ring_freezes "
           "FROM pg_netstat_devices ORDER BY device")
ROLES = "SELECT * FROM pg_netstat_roles ORDER BY role"
DATABASES = "SELECT * FROM pg_netstat_databases ORDER BY database"
EGRESS = "SELECT * FROM pg_netstat_egress ORDER BY peer_class, backend_type"
APPLICATIONS = "SELECT * FROM pg_netstat_applications ORDER BY role, database, application"
STATEMENTS = "SELECT * FROM pg_netstat_statements ORDER BY role, database, kind, queryid"
STATEMENT_TABLE = "SELECT * FROM pg_netstat_statement_table"


@pytest.fixture
def server():
    c = Cluster(free_port(), conf=CONF)
    c.start()
    try:
        c.sql("CREATE EXTENSION pg_netstat")
        c.sql("CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN")
        wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")
        yield c
    finally:
        c.stop()
        c.remove()


def start_and_wait(c):
    """Starts the server and waits until its collector has loaded the file and captures."""
    c.start()
    wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")


def saved_file(c):
    return c.dir / "data" / "pg_stat" / "pg_netstat.stat"


def tcp_traffic(c, user, kib):
    """One TCP connection as `user` with a result of `kib` KiB (captured on lo)."""
    c.sql(f"SELECT repeat('x', {kib * 1024})", host="127.0.0.1", user=user)


def everything(c):
    return {"history": c.rows(HISTORY), "devices": c.rows(DEVICES), "roles": c.rows(ROLES),
            "databases": c.rows(DATABASES), "egress": c.rows(EGRESS), "applications": c.rows(APPLICATIONS)}


def totals(snapshot):
    return {k: v for k, v in snapshot.items() if k != "history"}


def bytes_out_in_history(snapshot):
    return sum(int(r[6]) for r in snapshot["history"])


def settled(c):
    """Everything the views show, once the traffic so far is all in them (`quiesce`)."""
    quiesce(c)
    return everything(c)


def test_a_fast_restart_keeps_every_row_and_total_and_counting_goes_on(server):
    c = server
    for user, kib in (("alice", 300), ("bob", 40), ("alice", 7)):
        tcp_traffic(c, user, kib)
    # Rows to keep: a few one-second intervals (idle ones are rows too).
    wait_for("three rows of history", lambda: len(c.rows(HISTORY)) >= 3)
    before = settled(c)
    assert {r[0] for r in before["roles"]} >= {"alice", "bob"}
    assert len(before["history"]) >= 3
    assert [r[:2] for r in before["egress"]] == [["loopback", "client backend"]], before["egress"]
    assert {(r[0], r[3]) for r in before["applications"]} == {("alice", "2"), ("bob", "1")}, before["applications"]

    mark = len(c.log())
    c.stop("fast")
    stopped = time.time()
    assert saved_file(c).exists()
    time.sleep(3)  # down for a few intervals
    started = time.time()
    c.start()
    wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")
    log = c.log()[mark:]
    assert re.search(r'pg_netstat: saved the counted state to "pg_stat/pg_netstat.stat" \(\d+ bytes', log), log
    assert re.search(r"pg_netstat: loaded \d+ intervals of 1 device, .* saved \d+ s ago when the collector stopped", log), log

    after = everything(c)
    # Every row published before the restart is still there, unchanged (the views keep
    # their order); newer rows follow for the time since the start, none for the time
    # the server was down.
    assert after["history"][:len(before["history"])] == before["history"]
    newer = after["history"][len(before["history"]):]
    assert all(r[1] > before["history"][-1][1] for r in newer)
    down = c.rows(f"SELECT ts FROM pg_netstat_intervals WHERE ts >= to_timestamp({stopped + 1}) "
                  f"AND ts + make_interval(secs => interval_seconds) <= to_timestamp({started})")
    assert down == [], f"rows for the time the server was down: {down}"
    # No TCP traffic since: the totals are exactly those from before the restart.
    for what in ("devices", "roles", "databases", "egress", "applications"):
        assert after[what] == before[what], what

    # Counting continues into them.
    tcp_traffic(c, "alice", 100)
    wait_for("alice's new bytes added to her saved total", lambda: int(c.sql(
        "SELECT bytes_out FROM pg_netstat_roles WHERE role = 'alice'")) > int(
        [r for r in before["roles"] if r[0] == "alice"][0][5]) + 100 * 1024, timeout=20)
    dev_before = int(before["devices"][0][4])
    wait_for("the device total grows from its saved value", lambda: int(c.sql(
        "SELECT bytes_out FROM pg_netstat_devices")) > dev_before + 100 * 1024, timeout=20)


def statements_settled(c, role):
    """The statement rows once `role`'s TCP backends have exited: a backend's exit
    callback charges what was left to its statement before its pg_stat_activity row goes."""
    wait_for(f"{role}'s backends to exit", lambda: c.sql(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND client_addr IS NOT NULL") == "0")
    return c.rows(STATEMENTS)


def test_a_fast_restart_keeps_the_statement_rows_and_counting_goes_on(server):
    c = server
    script = "SELECT repeat('x', 200000); SELECT 1; SELECT count(*) FROM pg_class; SELECT 1;"
    c.sql(script, host="127.0.0.1", user="alice")
    c.sql("SELECT repeat('y', 3000)", host="127.0.0.1", user="bob")
    statements_settled(c, "bob")
    before = statements_settled(c, "alice")
    kinds = {(r[0], r[2]) for r in before}
    assert kinds >= {("alice", "setup"), ("alice", "statement"), ("bob", "setup"), ("bob", "statement")}, before
    big = [r for r in before if r[0] == "alice" and int(r[7]) > 200000]
    assert len(big) == 1 and big[0][5] == "1", before
    table_before = c.rows(STATEMENT_TABLE)

    mark = len(c.log())
    c.stop("fast")
    start_and_wait(c)
    # The same rows with the same values: every column (calls, bytes, segments, RTT,
    # first/last seen, stats_reset), the role and database names resolved again.
    assert c.rows(STATEMENTS) == before
    assert c.rows(STATEMENT_TABLE) == table_before
    assert re.search(rf"pg_netstat: loaded .* and {len(before)} statement rows from", c.log()[mark:]), c.log()[mark:]

    # Counting goes on into the loaded rows.
    c.sql("SELECT repeat('x', 200000)", host="127.0.0.1", user="alice")
    after = statements_settled(c, "alice")
    again = [r for r in after if r[0] == "alice" and r[3] == big[0][3] and r[2] == "statement"]
    assert len(again) == 1 and again[0][5] == "2" and int(again[0][7]) > 2 * 200000, after
    assert again[0][13] == big[0][13], "first_seen kept"


def test_a_saved_table_larger_than_max_statements_is_folded_into_other_rows():
    """A file written with more statement rows than pg_netstat.max_statements now allows
    (by the independent encoder): the most recently charged rows keep their own rows, the
    rest are folded into their role's and database's 'other' row, as eviction does; not a
    byte or call is lost."""
    c = Cluster(free_port(), conf=CONF + ["pg_netstat.max_statements = 10"])
    c.start()
    try:
        c.sql("CREATE EXTENSION pg_netstat; CREATE ROLE alice LOGIN")
        sysid = int(c.sql("SELECT system_identifier FROM pg_control_system()"))
        alice = int(c.sql("SELECT oid FROM pg_roles WHERE rolname = 'alice'"))
        db = int(c.sql("SELECT oid FROM pg_database WHERE datname = 'postgres'"))
        c.stop("fast")
        t0 = (int(time.time()) - 3600) * 1_000_000
        # 30 statements charged once each, a second apart, then a connection's setup:
        # 31 rows for 10 places.
        stmts = [dict(kind="statement", queryid=1000 + q, calls=q, bytes_in=10 * q, bytes_out=1000 * q,
                      segments_in=q, segments_out=2 * q, retransmits=q % 3, rtt_sum_us=50 * q, rtt_samples=q,
                      rtt_max_us=70 + q, first_seen_us=t0 + q * 1_000_000, last_seen_us=t0 + q * 1_000_000 + 5)
                 for q in range(1, 31)]
        setup = dict(kind="setup", calls=4, bytes_in=400, bytes_out=900, first_seen_us=t0, last_seen_us=t0 + 31_000_000)
        records = [statement_row(userid=alice, dbid=db, **r) for r in stmts + [setup]]
        path = saved_file(c)
        path.write_bytes(saved_file_bytes(sysid, ["lo"], int(time.time()) - 60, 0, statements=records,
                                          statement_table=(5, 0, t0)))
        run(["chown", "postgres:postgres", str(path)])
        mark = len(c.log())
        start_and_wait(c)
        log = c.log()[mark:]
        # The first 10 took the places; each later one evicted the least recent (the
        # first evicted became alice's 'other' row): 22 folded, 9 kept on their own.
        assert "and 31 statement rows (22 folded into 'other' rows to fit pg_netstat.max_statements = 10)" in log, log
        assert c.rows("SELECT max_statements, statements, evictions, overflow_charges, "
                      "(extract(epoch FROM stats_reset) * 1000000)::bigint FROM pg_netstat_statement_table") == [
            ["10", "10", str(5 + 22), "0", str(t0)]]
        cols = ("kind, coalesce(queryid, 0), calls, bytes_in, bytes_out, segments_in, segments_out, retransmits, "
                "round(mean_rtt_ms::numeric, 6), max_rtt_ms, (extract(epoch FROM first_seen) * 1000000)::bigint, "
                "(extract(epoch FROM last_seen) * 1000000)::bigint")
        rows = c.rows(f"SELECT {cols} FROM pg_netstat_statements WHERE role = 'alice' AND database = 'postgres' "
                      "ORDER BY kind, queryid")

        def expect(kind, queryid, group):
            n = lambda k: sum(r.get(k, 0) for r in group)
            rtt = "%.6f" % (n("rtt_sum_us") / n("rtt_samples") / 1000) if n("rtt_samples") else ""
            rtt_max = max(r.get("rtt_max_us", 0) for r in group)
            return [kind, str(queryid), str(n("calls")), str(n("bytes_in")), str(n("bytes_out")),
                    str(n("segments_in")), str(n("segments_out")), str(n("retransmits")), rtt,
                    (str(rtt_max / 1000) if rtt else ""), str(min(r["first_seen_us"] for r in group)),
                    str(max(r["last_seen_us"] for r in group))]
        want = ([expect("other", 0, stmts[:22]), expect("setup", 0, [setup])]
                + [expect("statement", r["queryid"], [r]) for r in stmts[22:]])
        assert rows == want
        # Nothing lost from the totals.
        assert c.rows("SELECT sum(calls), sum(bytes_in), sum(bytes_out) FROM pg_netstat_statements") == [
            [str(sum(r["calls"] for r in stmts) + 4), str(sum(r["bytes_in"] for r in stmts) + 400),
             str(sum(r["bytes_out"] for r in stmts) + 900)]]
    finally:
        c.stop()
        c.remove()


def test_an_immediate_stop_keeps_what_the_last_periodic_save_held(server):
    c = server
    c.change_settings("ALTER SYSTEM SET pg_netstat.save_interval = 1")
    tcp_traffic(c, "alice", 200)
    saved = settled(c)
    # A periodic save after the settled state: the file is newer than the newest row.
    newest_row = c.sql("SELECT extract(epoch FROM max(created_at)) FROM pg_netstat_intervals")
    wait_for("a periodic save after the last row", lambda: saved_file(c).stat().st_mtime > float(newest_row) + 0.5)
    # From here on only a shutdown would save; then more traffic, and a crash.
    c.change_settings("ALTER SYSTEM SET pg_netstat.save_interval = 0")
    assert totals(settled(c)) == totals(saved)
    tcp_traffic(c, "bob", 500)
    tcp_traffic(c, "alice", 500)
    lost = settled(c)
    assert bytes_out_in_history(lost) > bytes_out_in_history(saved) + 1000 * 1024

    mark = len(c.log())
    c.stop("immediate")
    c.start()
    wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")
    after = everything(c)
    log = c.log()[mark:]
    # What the save held survives; what came after it is lost, and the log says so.
    assert totals(after) == totals(saved)
    assert after["history"][:len(saved["history"])] == saved["history"]
    assert bytes_out_in_history(after) == bytes_out_in_history(saved)
    assert re.search(r"saved \d+ s ago by a periodic save; the server then stopped without a clean shutdown, "
                     r"so what was counted from that save until it stopped is lost", log), log


def valid_file_bytes(c):
    tcp_traffic(c, "alice", 20)
    settled(c)
    c.stop("fast")
    data = saved_file(c).read_bytes()
    assert data[:8] == b"PGNETST\0"
    return data


def with_sections_added(good, tag, record, copies):
    """`good` with `copies` more one-record sections of `tag`, resealed (length and checksum)."""
    body = good[32:] + b"".join(struct.pack("<III", tag, len(record), 1) + record for _ in range(copies))
    return good[:16] + struct.pack("<QI", len(body), zlib.crc32(body)) + good[28:32] + body


def seventeen_devices(good):
    """A file whose every section is within its limit, with 17 device sections of one
    device each (issue 29: such a file used to load 17 devices, over the most there are)."""
    record = struct.pack("<16s10Q", b"eth9", *([0] * 10))
    return with_sections_added(good, 2, record, 16)


BAD_FILES = {
    "empty": (lambda good: b"", "the file is empty"),
    "truncated": (lambda good: good[:len(good) // 2], "the file is truncated: "),
    "corrupted": (lambda good: good[:40] + bytes([good[40] ^ 0xFF]) + good[41:],
                  "the checksum does not match"),
    "wrong version": (lambda good: good[:8] + struct.pack("<II", 999, 999) + good[16:],
                      "the file has format 999, readable only from format 999 on"),
    "foreign": (lambda good: b"PGDMP\x01\x0e\x00 not ours at all" * 10, "not a pg_netstat file"),
    "seventeen devices": (seventeen_devices, "it holds 17 records of kind 2, more than the 16 that can exist"),
}


def test_bad_files_never_stop_the_server_and_are_set_aside(server):
    c = server
    good = valid_file_bytes(c)
    path = saved_file(c)
    for name, (make, reason) in BAD_FILES.items():
        bad = make(good)
        path.write_bytes(bad)
        run(["chown", "postgres:postgres", str(path)])
        for old in path.parent.glob("pg_netstat.stat.bad-*"):
            old.unlink()
        mark = len(c.log())
        c.start()
        assert c.sql("SELECT 1") == "1", name
        wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")
        lines = [l for l in c.log()[mark:].splitlines() if "pg_netstat.stat" in l and "not loaded" in l]
        assert len(lines) == 1 and reason in lines[0] and "counting starts fresh" in lines[0], (name, lines)
        aside = list(path.parent.glob("pg_netstat.stat.bad-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == bad, name
        assert f'moved to "pg_stat/{aside[0].name}"' in lines[0]
        # Counting starts fresh, and works.
        assert c.rows("SELECT * FROM pg_netstat_roles") == [], name
        tcp_traffic(c, "bob", 10)
        wait_for("bob counted", lambda: c.sql("SELECT count(*) FROM pg_netstat_roles WHERE role = 'bob'") == "1",
                 timeout=20)
        c.stop("fast")


def file_with_history(system_identifier, device, rows, now, timeline=1, statements=None):
    return saved_file_bytes(system_identifier, [device], now, rows, timeline, statements=statements)


def test_an_hour_of_one_second_rows_with_history_3600():
    c = Cluster(free_port(), conf=BASE_CONF + ["pg_netstat.history = 3600"])
    c.start()
    try:
        c.sql("CREATE EXTENSION pg_netstat")
        # The documented cost: 160 bytes a row for each of 16 device places.
        size = int(c.sql("SELECT size FROM pg_shmem_allocations WHERE name = 'pg_netstat history'"))
        assert size == 16 * 3600 * 160
        sysid = int(c.sql("SELECT system_identifier FROM pg_control_system()"))
        c.stop("fast")
        # Five thousand rows of the last 83 minutes: the newest 3600 are kept.
        now = int(time.time())
        path = saved_file(c)
        path.write_bytes(file_with_history(sysid, "lo", 5000, now))
        run(["chown", "postgres:postgres", str(path)])
        c.start()
        wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")
        # The history is full: the newest of the loaded rows, then the rows counted since
        # the start (each of which pushed out the oldest).
        rows = c.rows("SELECT extract(epoch FROM ts)::bigint, packets_in FROM pg_netstat WHERE device = 'lo' ORDER BY ts")
        assert len(rows) == 3600
        loaded = [r for r in rows if int(r[0]) < now]
        since = len(rows) - len(loaded)
        assert 0 <= since < 60
        assert [int(r[0]) for r in loaded] == list(range(now - 3600 + since, now))
        assert all(r[1] == "1" for r in loaded)
        assert "pg_netstat: loaded 3600 intervals of 1 device" in c.log()
    finally:
        c.stop()
        c.remove()


def test_another_clusters_file_and_a_file_from_another_timeline_are_set_aside(server):
    c = server
    SYSID[c.port] = int(c.sql("SELECT system_identifier FROM pg_control_system()"))
    c.stop("fast")
    path = saved_file(c)
    t0 = int(time.time())
    # Statement rows go with the file: refused with it, loaded with it.
    stmts = [statement_row("statement", userid=10, dbid=5, queryid=q, calls=1, bytes_out=100,
                           first_seen_us=(t0 - 200) * 1_000_000, last_seen_us=(t0 - 150) * 1_000_000)
             for q in range(3)]
    for wrong, reason in ((dict(system_identifier=12345), "it was written by another cluster (system identifier 12345"),
                          (dict(timeline=7), "it was written by a primary on timeline 7 and this server is on timeline 1")):
        bad = file_with_history(wrong.get("system_identifier", SYSID[c.port]), "lo", 10, t0 - 100,
                                timeline=wrong.get("timeline", 1), statements=stmts)
        path.write_bytes(bad)
        run(["chown", "postgres:postgres", str(path)])
        mark = len(c.log())
        c.start()
        wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")
        assert reason in c.log()[mark:]
        assert int(c.sql(f"SELECT count(*) FROM pg_netstat_intervals WHERE ts < to_timestamp({t0 - 50})")) == 0
        assert c.sql("SELECT count(*) FROM pg_netstat_statements") == "0"
        aside = sorted(path.parent.glob("pg_netstat.stat.bad-*"))
        assert aside and aside[-1].read_bytes() == bad
        c.stop("fast")
    # The same file with this cluster's identifier and timeline is loaded.
    path.write_bytes(file_with_history(SYSID[c.port], "lo", 10, t0 - 100, statements=stmts))
    run(["chown", "postgres:postgres", str(path)])
    c.start()
    wait_for("lo capturing", lambda: c.sql("SELECT state FROM pg_netstat_devices") == "capturing")
    assert int(c.sql(f"SELECT count(*) FROM pg_netstat_intervals WHERE ts < to_timestamp({t0 - 50})")) == 10
    assert c.rows("SELECT count(*), sum(bytes_out) FROM pg_netstat_statements") == [["3", "300"]]


def test_a_standby_made_by_a_base_backup_does_not_take_the_primarys_file(server):
    c = server
    c.change_settings("ALTER SYSTEM SET pg_netstat.save_interval = 1")
    tcp_traffic(c, "alice", 30)
    settled(c)
    wait_for("a saved file on the primary", lambda: saved_file(c).exists())
    standby = Cluster.__new__(Cluster)
    standby.dir, standby.port = c.dir.parent / (c.dir.name + "_standby"), free_port()
    standby.dir.mkdir()
    run(["chown", "postgres:postgres", str(standby.dir)])
    try:
        run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", str(PGBIN / "pg_basebackup"),
             "-h", str(c.dir), "-p", str(c.port), "-U", "postgres", "-D", str(standby.dir / "data"), "-R",
             "-c", "fast"])  # the checkpoint at once: a spread one takes seconds
        assert (standby.dir / "data" / "pg_stat" / "pg_netstat.stat").exists(), "the backup did not copy the file"
        with open(standby.dir / "data" / "postgresql.conf", "a") as conf:
            conf.write(f"port = {standby.port}\nunix_socket_directories = '{standby.dir}'\n"
                       "listen_addresses = ''\n")
        standby.start()
        assert standby.sql("SELECT pg_is_in_recovery()") == "t"
        wait_for("the standby's collector refusing the file", lambda: "was not loaded: it was written by a primary "
                 "and this server is a standby" in standby.log())
        assert len(list((standby.dir / "data" / "pg_stat").glob("pg_netstat.stat.bad-*"))) == 1
        assert standby.rows("SELECT * FROM pg_netstat_roles") == []
        assert c.rows("SELECT role FROM pg_netstat_roles") == [["alice"]]
    finally:
        standby.stop("immediate")
        standby.remove()


def test_reset_reaches_the_saved_file_at_once(server):
    c = server
    tcp_traffic(c, "alice", 50)
    settled(c)
    c.stop("fast")
    start_and_wait(c)
    assert int(c.sql("SELECT bytes_out FROM pg_netstat_roles WHERE role = 'alice'")) > 50 * 1024
    assert int(c.sql("SELECT sum(bytes_out) FROM pg_netstat_statements WHERE role = 'alice'")) > 50 * 1024
    before = saved_file(c).stat().st_mtime
    c.sql("SELECT pg_netstat_reset()")
    wait_for("a save after the reset", lambda: saved_file(c).stat().st_mtime > before, timeout=15)
    # A crash right after the reset does not bring the totals back.
    c.stop("immediate")
    start_and_wait(c)
    # (A name whose figures are all zero is not carried over a restart.)
    assert c.sql("SELECT coalesce(sum(bytes_out), 0) FROM pg_netstat_roles") == "0"
    assert c.sql("SELECT sum(bytes_out) FROM pg_netstat_devices") == "0"
    # The statement table too: empty, and its stats_reset the reset's.
    assert c.sql("SELECT count(*) FROM pg_netstat_statements") == "0"
    assert c.sql("SELECT stats_reset IS NOT NULL AND statements = 0 FROM pg_netstat_statement_table") == "t"


def test_alter_extension_update_with_a_saved_file_present():
    """A database still on the first release's SQL when the server restarts onto this
    library with a saved file: the old views show the loaded rows, and after ALTER
    EXTENSION UPDATE the new ones show the same."""
    c = Cluster(free_port(), conf=CONF)
    c.start()
    try:
        c.sql("CREATE EXTENSION pg_netstat VERSION '0.1.0'")
        c.sql("CREATE ROLE alice LOGIN")
        tcp_traffic(c, "alice", 120)
        columns = "SELECT device, ts, packets_in, packets_out, bytes_in, bytes_out FROM pg_netstat_intervals ORDER BY ts"
        wait_for("the traffic published", lambda: sum(int(r[5]) for r in c.rows(columns)) > 120 * 1024, timeout=20)
        before = c.rows(columns)
        c.stop("fast")
        start_and_wait(c)
        assert c.rows(columns)[:len(before)] == before
        c.sql("ALTER EXTENSION pg_netstat UPDATE")
        assert c.sql("SELECT extversion FROM pg_extension WHERE extname = 'pg_netstat'") != "0.1.0"
        assert c.rows(columns)[:len(before)] == before
        assert c.sql("SELECT bytes_out > 120 * 1024 FROM pg_netstat_roles WHERE role = 'alice'") == "t"
    finally:
        c.stop()
        c.remove()


def test_a_file_whose_load_killed_the_collector_is_not_loaded_again(tmp_path):
    """The collector killed (SIGKILL) while it loads a large file: the crash restart that
    follows sets the file aside instead of loading it again (issue 29: a file that kills
    its loader would otherwise do so at every restart)."""
    c = Cluster(free_port(), conf=CONF)
    c.start()
    try:
        c.sql("CREATE EXTENSION pg_netstat")
        sysid = int(c.sql("SELECT system_identifier FROM pg_control_system()"))
        c.stop("fast")
        now = int(time.time())
        # The most statement rows a file may hold: a load that takes a while.
        rows = [statement_row("statement", userid=10, dbid=5, queryid=q + 1, calls=1, bytes_out=100,
                              first_seen_us=(now - 200) * 1_000_000, last_seen_us=(now - 150) * 1_000_000)
                for q in range(1_000_000)]
        big = file_with_history(sysid, "lo", 10, now - 100, statements=rows)
        path = saved_file(c)
        mark_path = path.with_name(path.name + ".loading")
        path.write_bytes(big)
        run(["chown", "postgres:postgres", str(path)])
        mark = len(c.log())
        env = dict(os.environ, NO_CAP_NET_RAW="", EXTRA_CAPS="")
        starter = subprocess.Popen([str(ROOT / "scripts" / "cluster"), "start", str(c.dir)], env=env)
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            if mark_path.exists():
                pid = c.worker_pid()
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
            time.sleep(0.002)
        starter.wait(timeout=60)
        assert killed, "the load was never seen under way"
        wait_for("the crash restart", lambda: "all server processes terminated; reinitializing" in c.log()[mark:])

        def capturing_again():
            try:
                return c.sql("SELECT state FROM pg_netstat_devices") == "capturing"
            except SqlError:  # still in crash recovery
                return False
        wait_for("lo capturing again", capturing_again, timeout=60)
        lines = [l for l in c.log()[mark:].splitlines() if "pg_netstat.stat" in l and "not loaded" in l]
        assert len(lines) == 1 and "a load of it began and never finished" in lines[0], lines
        aside = list(path.parent.glob("pg_netstat.stat.bad-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == big
        assert not mark_path.exists() and not path.exists() or path.read_bytes() != big
        # Nothing of it was loaded by the new collector; counting goes on.
        assert c.sql("SELECT count(*) FROM pg_netstat_statements WHERE queryid < 1000001 AND bytes_out = 100") == "0"
        assert int(c.sql(f"SELECT count(*) FROM pg_netstat_intervals WHERE ts < to_timestamp({now - 50})")) == 0
    finally:
        c.stop()
        c.remove()
