"""Who the bytes go to, as a bill sees it: pg_netstat_egress (bytes per class of client
address and backend type), pg_netstat_applications (per role, database and application
name, from the backends' own sockets) and the backends' socket figures in
pg_netstat_connections, checked against tcpdump on both captured devices: the loopback
(127.0.0.1, class 'loopback') and the veth pair to the test's namespace (169.254.77.2,
class 'link-local'). The application name of a connection stays on its row after it
closed."""

import subprocess

import pytest

from harness import PGBIN, Cluster, Tcpdump, free_port, pcap_by_client, pcap_payloads, run, wait_for

PSQL = str(PGBIN / "psql")
PORT_SQL = "SELECT inet_client_port();"


def psql(cluster, host, app, sql, user="postgres", netns=None):
    """One TCP connection running `sql`; returns its client port (the first line out)."""
    cmd = ["env", f"PGAPPNAME={app}", PSQL, "-X", "-qAt", "-h", host, "-p", str(cluster.port), "-U", user,
           "-d", "postgres", "-c", PORT_SQL + sql]
    if netns:
        cmd = ["ip", "netns", "exec", netns.name, *cmd]
    return int(run(cmd).stdout.splitlines()[0])


def egress(cluster):
    """{(peer_class, backend_type): (bytes_in, bytes_out, socket_bytes_in, socket_bytes_out)}"""
    rows = cluster.rows("SELECT peer_class, coalesce(backend_type, '-'), coalesce(bytes_in, 0), coalesce(bytes_out, 0), "
                        "coalesce(socket_bytes_in, 0), coalesce(socket_bytes_out, 0) FROM pg_netstat_egress")
    return {(c, k): tuple(map(int, v)) for c, k, *v in rows}


def delta(after, before, key):
    a, b = after.get(key, (0, 0, 0, 0)), before.get(key, (0, 0, 0, 0))
    return tuple(x - y for x, y in zip(a, b))


def payload(path, server_port, client_port):
    """TCP payload bytes (in, out) of one connection, as the server's kernel counts them."""
    got = {"in": 0, "out": 0}
    for direction, n, _ in pcap_payloads(path, server_port, client_port):
        got[direction] += n
    return got["in"], got["out"]


def application(cluster, app):
    rows = cluster.rows("SELECT role, connections, bytes_in, bytes_out FROM pg_netstat_applications "
                        f"WHERE application = '{app}'")
    return [(r, int(c), int(i), int(o)) for r, c, i, o in rows]


def test_egress_per_peer_class_and_application_totals_equal_tcpdump(cluster, netns, tmp_path):
    lo, veth = "lo", netns.host_if
    with Tcpdump(lo, cluster.port, tmp_path) as td_lo, Tcpdump(veth, cluster.port, tmp_path) as td_veth:
        before = egress(cluster)
        # A big result to the namespace (link-local), small ones on the loopback; the
        # checking session is on the Unix socket, which is not counted anywhere.
        export = psql(cluster, netns.host_ip, "pgn_export", "SELECT repeat('x', 500000)", netns=netns)
        # Closed, its row keeps the application name and backend type its backend registered.
        closed = ("SELECT application_name, backend_type, peer_class FROM pg_netstat_connections "
                  f"WHERE client_port = {export} AND device = '{veth}' AND closed_at IS NOT NULL")
        wait_for("the closed export connection's row", lambda: cluster.rows(closed), timeout=10)
        assert cluster.rows(closed) == [["pgn_export", "client backend", "link-local"]]
        web = [psql(cluster, "127.0.0.1", "pgn_web", f"SELECT repeat('y', {n})") for n in (20000, 3000)]
        td_lo.wait_closed()
        td_veth.wait_closed()
    by_lo, by_veth = pcap_by_client(td_lo.path, cluster.port), pcap_by_client(td_veth.path, cluster.port)
    # Nothing but the test's connections crossed either device while tcpdump listened.
    assert set(by_lo) == set(web) and set(by_veth) == {export}, (by_lo.keys(), by_veth.keys())

    def captured_matches():
        after = egress(cluster)
        got = {k: delta(after, before, k)[:2] for k in (("loopback", "client backend"), ("link-local", "client backend"))}
        want = {("loopback", "client backend"): (sum(by_lo[p]["bytes_in"] for p in web),
                                                 sum(by_lo[p]["bytes_out"] for p in web)),
                ("link-local", "client backend"): (by_veth[export]["bytes_in"], by_veth[export]["bytes_out"])}
        return got == want or print(got, want)
    wait_for("captured egress per peer class to equal tcpdump", captured_matches, timeout=15)

    # The backends' own figures: payload bytes, per application and per peer class.
    ex_in, ex_out = payload(td_veth.path, cluster.port, export)
    web_in = sum(payload(td_lo.path, cluster.port, p)[0] for p in web)
    web_out = sum(payload(td_lo.path, cluster.port, p)[1] for p in web)
    assert ex_out > 500000
    assert application(cluster, "pgn_export") == [("postgres", 1, ex_in, ex_out)]
    assert application(cluster, "pgn_web") == [("postgres", 2, web_in, web_out)]
    after = egress(cluster)
    assert delta(after, before, ("link-local", "client backend"))[2:] == (ex_in, ex_out)
    assert delta(after, before, ("loopback", "client backend"))[2:] == (web_in, web_out)


def test_walsenders_are_their_own_egress_row(cluster, tmp_path):
    """A base backup over TCP (two replication connections: the backup, and the WAL
    streamed beside it) is walsender traffic, captured packet by packet and counted by
    the walsenders' own sockets when they exit."""
    with Tcpdump("lo", cluster.port, tmp_path) as td:
        before = egress(cluster)
        run(["env", "PGAPPNAME=pgn_backup", str(PGBIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(cluster.port),
             "-U", "postgres", "-D", str(tmp_path / "backup"), "-Ft", "-X", "stream", "--no-sync",
             "-c", "fast"])  # the checkpoint at once: a spread one took minutes
        td.wait_closed()
    by_port = pcap_by_client(td.path, cluster.port)
    assert len(by_port) == 2, by_port.keys()
    out = sum(c["bytes_out"] for c in by_port.values())
    assert out > 1_000_000, out
    key = ("loopback", "walsender")
    wait_for("the walsenders' captured egress", lambda: delta(egress(cluster), before, key)[:2] == (
        sum(c["bytes_in"] for c in by_port.values()), out), timeout=15)
    payload_out = sum(payload(td.path, cluster.port, p)[1] for p in by_port)
    payload_in = sum(payload(td.path, cluster.port, p)[0] for p in by_port)
    # Out: exact. In: a walsender can end before the client's Terminate message (5 bytes)
    # reaches it; what arrives after the backend's last reading is not in its counters
    # (seen: 659 of 664 bytes in). Documented in docs/connections.md.
    def own_counters():
        got_in, got_out = delta(egress(cluster), before, key)[2:]
        return (got_out == payload_out and 0 <= payload_in - got_in <= 5 * len(by_port)) or print(
            "socket (in, out):", (got_in, got_out), "tcpdump payload:", (payload_in, payload_out))
    wait_for("the walsenders' own counters at their exit", own_counters, timeout=10)
    assert cluster.rows("SELECT role, coalesce(database, '-'), connections FROM pg_netstat_applications "
                        "WHERE application = 'pgn_backup'") == [["postgres", "", "2"]]


@pytest.fixture(scope="module")
def nocap():
    """A cluster without CAP_NET_RAW: nothing is captured, the backends still count."""
    c = Cluster(free_port(), conf=["pg_netstat.capture_loopback = on"])
    c.start(cap_net_raw=False)
    try:
        c.sql("CREATE EXTENSION pg_netstat; CREATE ROLE pgn_nocap LOGIN")
        yield c
    finally:
        c.stop()
        c.remove()


def test_without_capture_connections_and_applications_come_from_the_backends(nocap, tmp_path):
    c = nocap
    with Tcpdump("lo", c.port, tmp_path) as td:
        live = subprocess.Popen(["env", "PGAPPNAME=pgn_live", PSQL, "-X", "-qAt", "-h", "127.0.0.1", "-p", str(c.port),
                                 "-U", "pgn_nocap", "-d", "postgres", "-c", "SELECT repeat('z', 70000)",
                                 "-c", "SELECT pg_sleep(30)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for("the live connection to sleep", lambda: c.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgn_live' AND wait_event = 'PgSleep'")
                == "1")
            # Its row: no capture figures, the backend's own as of its latest statement's
            # start (the 70,000-byte result went out before pg_sleep began).
            row = c.rows("SELECT usename, application_name, backend_type, peer_class, device IS NULL, "
                         "socket_bytes_in > 0, socket_bytes_out > 70000 "
                         "FROM pg_netstat_connections WHERE application_name = 'pgn_live'")
            assert row == [["pgn_nocap", "pgn_live", "client backend", "loopback", "t", "t", "t"]]
            port = int(c.sql("SELECT client_port FROM pg_stat_activity WHERE application_name = 'pgn_live'"))
        finally:
            c.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgn_live'")
            live.wait(timeout=20)
        td.wait_closed()
    want_in, want_out = payload(td.path, c.port, port)
    wait_for("the ended connection in pg_netstat_applications",
             lambda: application(c, "pgn_live") == [("pgn_nocap", 1, want_in, want_out)], timeout=10)
    assert c.sql("SELECT count(*) FROM pg_netstat_connections WHERE application_name = 'pgn_live'") == "0"
    # The table's own figures: every slot free again, nothing overflowed.
    assert c.rows("SELECT connections, slot_overflow, application_overflow FROM pg_netstat_statement_table") == [
        ["0", "0", "0"]]
