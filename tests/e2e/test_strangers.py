"""What a client that never logs in can do (issue 29): hundreds of failed logins under
invented role and database names, then two real roles. The names a client claims before
PostgreSQL has checked them never become rows of pg_netstat_roles or pg_netstat_databases,
are never saved and never exported; the traffic of those connections is counted exactly,
in pg_netstat_unauthenticated; the real roles keep their own rows, exact against tcpdump."""

import json
import os
import re
from pathlib import Path

import pytest

from conftest import CRASH_MARKERS, INTERVAL, capture_conf
from harness import PGBIN, Cluster, Tcpdump, free_port, pcap_by_client, run, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ROOT / "monitoring" / "postgres_exporter_queries.yaml"
PSQL = str(PGBIN / "psql")
# More failed logins with invented names than the 256 rows kept for roles and databases.
WRONG_PASSWORD, REJECTED, GONE_AFTER_STARTUP = 150, 80, 60
# Connections that never get a verdict: the backend is ended by authentication_timeout.
SILENT_AFTER_STARTUP, TLS_LEFT_HANGING = 8, 8
REAL = {"pgn_alice": "pgn_sales", "pgn_bob": "pgn_reports"}


@pytest.fixture(scope="module")
def cluster(netns):
    """Password logins from the test namespace: scram for the real roles, plain
    `password` for everyone else (so a failed login is one round trip), database
    pgn_nowhere refused by pg_hba.conf; TLS available; authentication_timeout as short
    as it goes."""
    net = f"{netns.host_ip.rsplit('.', 1)[0]}.0/30"
    c = Cluster(
        free_port(),
        conf=capture_conf(netns.host_if) + [
            "authentication_timeout = '1s'",
            "password_encryption = 'scram-sha-256'",
            "ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'",
        ],
        listen=f"127.0.0.1,{netns.host_ip}",
        hba_extra="\n".join([f"host all {','.join(REAL)} {net} scram-sha-256",
                             f"host pgn_nowhere all {net} reject",
                             f"host all all {net} password"]),
    )
    c.make_certificate()
    c.start()
    try:
        c.sql("CREATE EXTENSION pg_netstat")
        for role, db in REAL.items():
            c.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{role}-secret'; CREATE DATABASE {db} OWNER {role}")
        wait_for("the device capturing", lambda: c.rows(
            "SELECT device FROM pg_netstat_devices WHERE state = 'capturing'") == [[netns.host_if]])
        yield c
        bad = [line for line in c.log().splitlines() if any(m in line for m in CRASH_MARKERS)]
        assert not bad, "server log shows a crash:\n" + "\n".join(bad)
    finally:
        c.stop()
        if os.environ.get("PG_NETSTAT_KEEP_CLUSTER") != "1":
            c.remove()


# Runs in the test namespace: every kind of failed login, raw protocol, each under its
# own invented names; prints the client ports of each kind.
STRANGERS = r"""
import json, socket, struct, sys, time
host, port, counts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

def startup(s, user, db):
    body = struct.pack("!i", 196608) + b"".join(k + b"\0" + v.encode() + b"\0" for k, v in (
        (b"user", user), (b"database", db), (b"application_name", "app_" + user))) + b"\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)

def until_closed(s):
    s.settimeout(10)
    while s.recv(65536):
        pass

def conn():
    s = socket.create_connection((host, port))
    return s, s.getsockname()[1]

out = {k: [] for k in counts}
for i in range(counts["wrong_password"]):
    s, p = conn()
    startup(s, f"fake_{i}", f"fakedb_{i}")
    assert s.recv(9)[:1] == b"R"          # AuthenticationCleartextPassword
    pw = b"hunter2\0"
    s.sendall(b"p" + struct.pack("!i", len(pw) + 4) + pw)
    until_closed(s); s.close(); out["wrong_password"].append(p)
for i in range(counts["rejected"]):
    s, p = conn()
    startup(s, f"fake_r{i}", "pgn_nowhere")
    until_closed(s); s.close(); out["rejected"].append(p)
for i in range(counts["gone_after_startup"]):
    s, p = conn()
    startup(s, f"fake_g{i}", f"fakedb_g{i}")
    assert s.recv(9)[:1] == b"R"
    s.close(); out["gone_after_startup"].append(p)
held = []
for i in range(counts["silent_after_startup"]):
    s, p = conn()
    startup(s, f"fake_s{i}", f"fakedb_s{i}")
    held.append(s); out["silent_after_startup"].append(p)
for i in range(counts["tls_left_hanging"]):
    s, p = conn()
    s.sendall(struct.pack("!ii", 8, 80877103))
    assert s.recv(1) == b"S"
    s.sendall(b"\x16\x03\x01")            # the first bytes of a ClientHello, then nothing
    held.append(s); out["tls_left_hanging"].append(p)
for s in held:                            # authentication_timeout ends them all
    until_closed(s); s.close()
print(json.dumps(out))
"""


def session(cluster, netns, role, sql):
    cmd = ["ip", "netns", "exec", netns.name, "env", f"PGPASSWORD={role}-secret", PSQL, "-X", "-qAt",
           "-h", netns.host_ip, "-p", str(cluster.port), "-U", role, "-d", REAL[role], "-c", sql]
    return run(cmd).stdout


FIGURES = ("packets_in", "packets_out", "bytes_in", "bytes_out")


def total(rows):
    return {k: sum(r[k] for r in rows) for k in FIGURES}


def view_rows(cluster, sql):
    cols = ("name", "connections") + FIGURES
    return [dict(zip(cols, [r[0]] + [int(x) for x in r[1:]])) for r in cluster.rows(sql)]


def settle(get, want, timeout):
    """Polls `get` until it returns `want`, then compares once more, so that a timeout
    fails with the difference."""
    try:
        wait_for("the figures", lambda: get() == want, timeout=timeout)
    except AssertionError:
        pass
    assert get() == want


def exporter_queries():
    """The SQL of every family in the postgres_exporter queries file (its `query: |` blocks)."""
    queries, block, indent = [], None, 0
    for line in QUERIES.read_text().splitlines():
        if block is not None:
            if line.strip() and len(line) - len(line.lstrip()) > indent:
                block.append(line.strip())
                continue
            queries.append(" ".join(block))
            block = None
        if m := re.match(r"^(\s+)query: \|\s*$", line):
            block, indent = [], len(m.group(1))
    if block:
        queries.append(" ".join(block))
    return queries


def test_names_claimed_before_login_take_no_row_and_their_traffic_is_counted_apart(cluster, netns, tmp_path):
    cluster.sql("SELECT pg_netstat_reset()")
    counts = dict(wrong_password=WRONG_PASSWORD, rejected=REJECTED, gone_after_startup=GONE_AFTER_STARTUP,
                  silent_after_startup=SILENT_AFTER_STARTUP, tls_left_hanging=TLS_LEFT_HANGING)
    with Tcpdump(netns.host_if, cluster.port, tmp_path) as td:
        out = netns.exec(["python3", "-c", STRANGERS, netns.host_ip, str(cluster.port), json.dumps(counts)]).stdout
        strangers = json.loads(out)
        real = {}
        for role in REAL:
            # 2 MB each, after every failed login.
            real[role] = int(session(cluster, netns, role,
                                     "SELECT inet_client_port(); SELECT repeat('x', 2000000)").splitlines()[0])
        td.wait_closed()
    ref = pcap_by_client(td.path, cluster.port)
    failed = [p for ports in strangers.values() for p in ports]
    assert len(failed) == sum(counts.values()) and set(ref) == set(failed) | set(real.values())
    assert all(ref[p]["syn"] == 1 for p in failed)

    # Each real role, and its database, in a row of its own, exact; no other row at all.
    def roles_and_databases():
        return (view_rows(cluster, "SELECT coalesce(role, '<null>'), connections, packets_in, packets_out, "
                                   "bytes_in, bytes_out FROM pg_netstat_roles ORDER BY role"),
                view_rows(cluster, "SELECT coalesce(database, '<null>'), connections, packets_in, packets_out, "
                                   "bytes_in, bytes_out FROM pg_netstat_databases ORDER BY database"))
    want_roles = [dict(name=role, connections=1, **{k: ref[real[role]][k] for k in FIGURES}) for role in sorted(REAL)]
    want_dbs = sorted(({**r, "name": REAL[r["name"]]} for r in want_roles), key=lambda r: r["name"])
    settle(roles_and_databases, (want_roles, want_dbs), timeout=20)

    # Every failed login, exactly, in one place: the ones with a verdict at once, the
    # silent ones once their connection has been folded (one interval after it closed).
    want = dict(name="", connections=len(failed), **total([ref[p] for p in failed]))

    def unauthenticated():
        return view_rows(cluster, "SELECT '', connections, packets_in, packets_out, bytes_in, bytes_out "
                                  "FROM pg_netstat_unauthenticated")
    settle(unauthenticated, [want], timeout=INTERVAL * 3 + 20)

    # The claimed names appear per connection only, with what became of them.
    wrong = strangers["wrong_password"][0]
    rows = cluster.rows(f"SELECT usename, datname, auth FROM pg_netstat_connections WHERE client_port = {wrong}")
    assert rows in ([], [["fake_0", "fakedb_0", "authentication failed"]]), rows

    # Nothing invented in what a monitoring stack scrapes.
    for q in exporter_queries():
        for r in cluster.rows(q):
            assert not any("fake" in cell for cell in r), (q, r)

    # Nor in the saved file; after the restart the figures are back, the same.
    cluster.stop()
    saved = (cluster.dir / "data" / "pg_stat" / "pg_netstat.stat").read_bytes()
    assert b"pgn_alice" in saved and b"fake" not in saved
    cluster.start()
    settle(roles_and_databases, (want_roles, want_dbs), timeout=20)
    assert unauthenticated() == [want]
