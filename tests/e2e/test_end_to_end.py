"""End to end: a real server with the extension preloaded, real client traffic over
TCP on 127.0.0.1, ::1 and a veth pair into a network namespace, and the view's sums
compared with tcpdump's count of the same packets."""

import time

import pytest

from conftest import BUILD, EXPECTED_METHOD, INTERVAL
from harness import PGBIN, Cluster, SqlError, Tcpdump, cpu_ticks, free_port, next_interval, run, start_in_a_fresh_interval, wait_for

ORIGINAL_COLUMNS = [
    ("device", "text"), ("ts", "timestamp with time zone"),
    ("packets_in", "bigint"), ("packets_out", "bigint"),
    ("packets_in_speed", "bigint"), ("packets_out_speed", "bigint"),
    ("bytes_in", "bigint"), ("bytes_out", "bigint"),
    ("bytes_in_speed", "bigint"), ("bytes_out_speed", "bigint"),
    ("created_at", "timestamp with time zone"),
]


def test_view_has_the_original_columns_types_and_order(cluster):
    rows = cluster.rows("""
        SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = 'pg_netstat'::regclass AND attnum > 0 ORDER BY attnum""")
    assert [tuple(r) for r in rows] == ORIGINAL_COLUMNS


def make_traffic(cluster, netns):
    """Client sessions of different shapes on every path: small queries, large results
    (server to client), a large statement (client to server), and a short pgbench."""
    big_in = "x" * 200_000
    for host, ns in (("127.0.0.1", None), ("::1", None), (netns.host_ip, netns.name)):
        assert cluster.sql("SELECT 1", host=host, netns=ns) == "1"
        assert cluster.sql("SELECT length(string_agg(md5(i::text), '')) FROM generate_series(1, 20000) i",
                           host=host, netns=ns) == "640000"
        assert cluster.sql(f"SELECT length('{big_in}')", host=host, netns=ns) == "200000"
        assert len(cluster.sql("SELECT repeat('y', 300000)", host=host, netns=ns)) == 300000
    pgbench = [str(PGBIN / "pgbench"), "-n", "-S", "-c", "2", "-t", "300", "-p", str(cluster.port),
               "-U", "postgres", "postgres"]
    run(pgbench + ["-h", "127.0.0.1"])
    netns.exec(pgbench + ["-h", netns.host_ip])


def view_sums(cluster, device, first_sec, last_sec):
    """Sum of the view's rows for the intervals from the one holding `first_sec` to
    the one holding `last_sec`, once the last of them has been published."""
    lo, hi = first_sec - first_sec % INTERVAL, last_sec - last_sec % INTERVAL
    wait_for(f"interval {hi} of {device} to be published", lambda: cluster.sql(
        f"SELECT count(*) FROM pg_netstat WHERE device = '{device}' AND ts = to_timestamp({hi})") == "1",
        timeout=INTERVAL * 4 + 10)
    row = cluster.rows(f"""
        SELECT sum(packets_in), sum(packets_out), sum(bytes_in), sum(bytes_out), count(*)
          FROM pg_netstat
         WHERE device = '{device}' AND ts BETWEEN to_timestamp({lo}) AND to_timestamp({hi})""")[0]
    nrows = int(row[4])
    assert nrows == (hi - lo) // INTERVAL + 1, f"missing intervals for {device}: {nrows} rows"
    return dict(packets_in=int(row[0]), packets_out=int(row[1]), bytes_in=int(row[2]), bytes_out=int(row[3]))


def test_counts_equal_tcpdump_on_loopback_and_veth(cluster, netns, tmp_path):
    start_in_a_fresh_interval(cluster, INTERVAL, netns.name)
    with Tcpdump("lo", cluster.port, tmp_path) as lo_dump, \
            Tcpdump(netns.host_if, cluster.port, tmp_path) as veth_dump:
        make_traffic(cluster, netns)
        lo_dump.wait_closed()
        veth_dump.wait_closed()
    for dump, device in ((lo_dump, "lo"), (veth_dump, netns.host_if)):
        want = dump.tally()
        assert want["packets_in"] > 600 and want["packets_out"] > 600, (device, want)
        got = view_sums(cluster, device, want["first_sec"], want["last_sec"])
        expected = {k: want[k] for k in got}
        print(f"{device}: view {got} tcpdump {expected}")
        assert got == expected, f"{device}: view {got} != tcpdump {expected}"


def test_speeds_are_per_second_of_the_interval(cluster):
    # Waits for the clock: begin on an interval boundary, so that rows of this test's own
    # traffic begin at or after `start`. Length, alignment and publication time are
    # checked on those rows: the history may also hold what earlier tests' reloads left
    # on purpose — rows of other lengths, a shorter row where the length changed at a
    # boundary that is not a multiple of the new one, rows published early when a device
    # left the list. Every row's speeds follow its own length.
    next_interval(INTERVAL)
    start = int(time.time())
    for _ in range(3):
        cluster.sql("SELECT repeat('s', 20000)", host="127.0.0.1")
    wait_for("a row of this test's traffic", lambda: cluster.sql(
        f"SELECT count(*) FROM pg_netstat WHERE device = 'lo' AND ts >= to_timestamp({start}) AND packets_in > 0")
        != "0", timeout=INTERVAL * 4 + 10)
    rows = cluster.rows(f"""
        SELECT n.packets_in, n.packets_in_speed, n.bytes_out, n.bytes_out_speed, i.interval_seconds,
               extract(epoch FROM n.ts)::bigint % i.interval_seconds,
               n.created_at >= n.ts + make_interval(secs => i.interval_seconds + 1),
               n.ts >= to_timestamp({start})
          FROM pg_netstat n JOIN pg_netstat_intervals i USING (device, ts)""")
    mine = [r for r in rows if r[7] == "t"]
    assert mine, "no rows published for this test's traffic"
    assert any(int(r[1]) > 0 for r in mine), f"no speed above zero to check: {mine}"
    for p_in, p_in_speed, b_out, b_out_speed, secs, misaligned, after_wait, recent in rows:
        assert int(p_in_speed) == int(p_in) // int(secs)
        assert int(b_out_speed) == int(b_out) // int(secs)
        if recent == "t":
            assert int(secs) == INTERVAL
            assert misaligned == "0"
            assert after_wait == "t", "an interval was published before its end plus packet_wait_time"


def test_device_status_reports_capture(cluster, netns):
    cluster.sql("SELECT 1", host="127.0.0.1")
    cluster.sql("SELECT 1", host=netns.host_ip, netns=netns.name)
    wait_for("totals to be published", lambda: cluster.sql(
        "SELECT bool_and(packets_in > 0) FROM pg_netstat_devices") == "t", timeout=15)
    # (kernel_drops is a running total: the drop test may have run before this one.)
    rows = cluster.rows("""SELECT device, capture_method, state, packets_in > 0, kernel_drops >= 0, last_error IS NULL
                             FROM pg_netstat_devices""")
    m = EXPECTED_METHOD
    assert rows == sorted([[netns.host_if, m, "capturing", "t", "t", "t"], ["lo", m, "capturing", "t", "t", "t"]])


def test_view_is_for_pg_monitor_not_public(cluster):
    cluster.sql("CREATE ROLE pgn_plain LOGIN; CREATE ROLE pgn_monitor LOGIN IN ROLE pg_monitor")
    try:
        for obj in ("pg_netstat", "pg_netstat_devices", "pg_netstat_history()", "pg_netstat_intervals",
                    "pg_netstat_connections", "pg_netstat_roles", "pg_netstat_databases", "pg_netstat_flow_table",
                    "pg_netstat_flows()"):
            with pytest.raises(SqlError) as e:
                cluster.sql(f"SELECT count(*) FROM {obj}", user="pgn_plain")
            assert "permission denied" in e.value.stderr
            # pg_monitor reads them (over TCP, so there is at least this connection).
            assert int(cluster.sql(f"SELECT count(*) FROM {obj}", user="pgn_monitor", host="127.0.0.1")) > 0, obj
        # Resetting is for superusers, like pg_stat_reset().
        with pytest.raises(SqlError) as e:
            cluster.sql("SELECT pg_netstat_reset()", user="pgn_monitor")
        assert "permission denied" in e.value.stderr
    finally:
        cluster.sql("DROP ROLE pgn_plain; DROP ROLE pgn_monitor")


@pytest.mark.alone  # measures the worker's CPU time
def test_missing_device_is_reported_and_others_keep_counting(cluster, netns):
    mark = len(cluster.log())
    cluster.sql(f"ALTER SYSTEM SET pg_netstat.devices = '{netns.host_if},pgn-nosuch0'")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        wait_for("the missing device to be reported", lambda: cluster.rows(
            "SELECT device, state FROM pg_netstat_devices ORDER BY device") ==
            sorted([[netns.host_if, "capturing"], ["lo", "capturing"], ["pgn-nosuch0", "missing"]]))
        ticks = cpu_ticks(cluster.worker_pid())
        time.sleep(3)  # the span over which the worker's CPU is measured, not a wait
        assert cpu_ticks(cluster.worker_pid()) - ticks <= 5, "the worker is busy while a device is missing"
        assert cluster.log()[mark:].count('network device "pgn-nosuch0" does not exist') == 1
        # Capture elsewhere goes on: new loopback traffic still reaches the view.
        before = int(cluster.sql("SELECT sum(packets_in) FROM pg_netstat WHERE device = 'lo'"))
        cluster.sql("SELECT 1", host="127.0.0.1")
        wait_for("loopback counting to continue", lambda: int(cluster.sql(
            "SELECT sum(packets_in) FROM pg_netstat WHERE device = 'lo'")) > before, timeout=15)
    finally:
        cluster.sql("ALTER SYSTEM RESET pg_netstat.devices")
        cluster.sql("SELECT pg_reload_conf()")
    wait_for("the missing device to be forgotten after reload", lambda: cluster.rows(
        "SELECT device FROM pg_netstat_devices ORDER BY device") == sorted([[netns.host_if], ["lo"]]))


def test_create_extension_without_preload_explains_the_fix():
    c = Cluster(free_port(), preload=False)
    c.start()
    try:
        r = c.psql_result("CREATE EXTENSION pg_netstat")
        assert r.returncode != 0
        assert "pg_netstat must be loaded via shared_preload_libraries" in r.stderr
        assert "HINT:  Add pg_netstat to shared_preload_libraries" in r.stderr
        assert c.sql("SELECT 1") == "1", "the server must stay up"
    finally:
        c.stop()
        c.remove()


def test_capture_method_pcap_needs_the_pcap_build(cluster):
    r = cluster.psql_result("ALTER SYSTEM SET pg_netstat.capture_method = pcap")
    if EXPECTED_METHOD == "pcap":
        assert r.returncode == 0, r.stderr
        cluster.sql("ALTER SYSTEM RESET pg_netstat.capture_method")
    else:
        assert r.returncode != 0
        assert "This build of pg_netstat has no libpcap backend." in r.stderr
        assert "HINT:  Build it with the pcap feature" in r.stderr
    with pytest.raises(SqlError) as e:
        cluster.sql("ALTER SYSTEM SET pg_netstat.capture_method = dpdk")
    assert "Available values: auto, ring, pcap" in e.value.stderr


def test_capture_method_ring_needs_the_native_build(cluster):
    r = cluster.psql_result("ALTER SYSTEM SET pg_netstat.capture_method = ring")
    if BUILD == "portable":
        assert r.returncode != 0
        assert "This build of pg_netstat has no AF_PACKET ring (it is the portable build)." in r.stderr
        assert "HINT:  Use auto or pcap" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        cluster.sql("ALTER SYSTEM RESET pg_netstat.capture_method")
