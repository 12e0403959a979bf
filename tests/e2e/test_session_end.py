"""The end of a session (issue 28): a client that waits for the server to close before it
closes itself (asyncpg) is not kept waiting by pg_netstat, and the last bytes of every
session, its Terminate and, under TLS, both close_notify alerts, are in its rows however
late the client sends them. Each comparison is against tcpdump's TCP payload of the same
connections, exactly; the close times are against a server without the library, side by
side. The module owns its two servers (TLS on, plain text allowed), neither with
CAP_NET_RAW: statements need no capture."""
import asyncio
import os
import statistics
import subprocess
import time

import asyncpg
import pytest
from harness import PGBIN, Cluster, Tcpdump, free_port, pcap_connections, pcap_payloads, wait_for

# Runs alone (docs/testing.md): close times compared with a server without the library,
# and a test that loads both CPUs.
pytestmark = pytest.mark.alone

PSQL = str(PGBIN / "psql")
TLS_CONF = ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
ROLES = ("pgn_async", "pgn_many")


def tls_cluster(preload):
    c = Cluster(free_port(), conf=TLS_CONF, preload=preload)
    c.make_certificate()
    c.start(cap_net_raw=False)
    for role in ROLES:
        c.sql(f"CREATE ROLE {role} LOGIN")
    return c


@pytest.fixture(scope="module")
def servers():
    """{'with': a server with pg_netstat, 'without': one without it}, alike otherwise."""
    made = {}
    try:
        made["with"] = tls_cluster(preload=True)
        made["with"].sql("CREATE EXTENSION pg_netstat")
        made["without"] = tls_cluster(preload=False)
        yield made
    finally:
        for c in made.values():
            c.stop()
            c.remove()


def role_rows(cluster, role):
    """The sums of a role's rows in pg_netstat_statements (setup and statements)."""
    i, o = cluster.rows(f"SELECT coalesce(sum(bytes_in), 0), coalesce(sum(bytes_out), 0) "
                        f"FROM pg_netstat_statements WHERE role = '{role}'")[0]
    return {"bytes_in": int(i), "bytes_out": int(o)}


def payload(path, server_port):
    """tcpdump's TCP payload of every connection in the capture, in and out."""
    total = {"bytes_in": 0, "bytes_out": 0}
    for client in pcap_connections(path, [server_port]):
        for direction, n, _ in pcap_payloads(path, server_port, client):
            total["bytes_" + direction] += n
    return total


def backends_gone(cluster, role):
    """The role's backends have exited (their exit callbacks have charged what was left)."""
    wait_for(f"{role}'s backends to exit", lambda: cluster.sql(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'") == "0")


async def asyncpg_cycles(port, tls, n):
    """n cycles of connect, two statements, close with asyncpg; the close times (s)."""
    closes = []
    for _ in range(n):
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="pgn_async", database="postgres",
                                     ssl="require" if tls else "disable")
        await conn.fetchval("SELECT 1")
        await conn.fetchval("SELECT repeat('a', 20000)")
        t = time.perf_counter()
        await conn.close()
        closes.append(time.perf_counter() - t)
    return closes


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_asyncpg_close_is_not_kept_waiting_and_its_rows_equal_tcpdump(servers, tmp_path, mode):
    """asyncpg sends Terminate and then waits for the server to close (under TLS it
    answers the server's close_notify with its own, then sends its FIN). Its close takes
    no longer with pg_netstat than without (medians of cycles run alternately on the two
    servers; before this was built it took 20 ms longer, every time), and its rows add up
    to tcpdump's payload of its connections, the alert it sends last included."""
    tls = mode == "tls"
    w = servers["with"]
    w.sql("SELECT pg_netstat_reset()")
    closes = {"with": [], "without": []}
    with Tcpdump("lo", w.port, tmp_path) as td:
        for _ in range(8):
            for name in ("with", "without"):
                closes[name] += asyncio.run(asyncpg_cycles(servers[name].port, tls, 2))
        td.wait_closed()
    backends_gone(w, "pgn_async")
    median = {k: statistics.median(v) * 1000 for k, v in closes.items()}
    print(f"{mode}: asyncpg close, median ms: with {median['with']:.2f}, without {median['without']:.2f}")
    counted, wire = role_rows(w, "pgn_async"), payload(td.path, w.port)
    # 5 ms of room for this machine's noise; the wait this replaces cost 20.
    assert counted == wire and median["with"] <= median["without"] + 5, (counted, wire, median)


async def lock_after_close(port, tls, n):
    """n times: one connection takes a session advisory lock and closes; another, already
    open, tries the lock as soon as close() has returned. The number of tries that found
    it still held."""
    other = await asyncpg.connect(host="127.0.0.1", port=port, user="pgn_async", database="postgres",
                                  ssl="require" if tls else "disable")
    held = 0
    for _ in range(n):
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="pgn_async", database="postgres",
                                     ssl="require" if tls else "disable")
        await conn.execute("SELECT pg_advisory_lock(4242)")
        await conn.close()
        got = await other.fetchval("SELECT pg_try_advisory_lock(4242)")
        held += not got
        if got:
            await other.execute("SELECT pg_advisory_unlock(4242)")
    await other.close()
    return held


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_a_session_has_released_its_locks_when_asyncpg_sees_the_server_close(servers, mode):
    """asyncpg's close() returns when the server has closed the connection; PostgreSQL
    releases the session's locks before that (its exit's first steps), and pg_netstat's
    early close of the server's side must keep it so: a lock the closed session held is
    free for another session at once, every time."""
    assert asyncio.run(lock_after_close(servers["with"].port, mode == "tls", 30)) == 0


# Statements of different sizes each short session runs: results of 200 kB, a few kB,
# a few bytes, a COPY, and a failure.
SESSION = [
    "SELECT repeat('x', 200000)",
    "SELECT repeat('k', 3000), 1",
    "SELECT 7",
    "COPY (SELECT generate_series(1, 3000)) TO STDOUT",
    "SELECT * FROM pgn_no_such_table",
]


def busy_cpus(n):
    """n processes that keep a CPU busy each (the test's load: a machine where the
    clients' last records and FINs are late)."""
    return [subprocess.Popen(["python3", "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.parametrize("round_", [1, 2])
@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_many_short_sessions_at_once_on_a_loaded_machine_add_up_to_tcpdump(servers, tmp_path, mode, round_):
    """48 psql sessions at once (24 times the cores), each connecting, running statements
    of different sizes and closing, while 4 processes keep the CPUs busy: the sum of the
    role's rows equals tcpdump's payload of the connections, both ways, exactly. Under TLS
    every session ends with the client's Terminate and close_notify, which a busy client
    sends late."""
    w = servers["with"]
    w.sql("SELECT pg_netstat_reset()")
    env = dict(os.environ, PGSSLMODE="require" if mode == "tls" else "disable")
    script = "".join(s + ";\n" for s in SESSION)
    load = busy_cpus(4)
    try:
        with Tcpdump("lo", w.port, tmp_path) as td:
            clients = [subprocess.Popen([PSQL, "-X", "-qAt", "-h", "127.0.0.1", "-p", str(w.port), "-U", "pgn_many",
                                         "-d", "postgres", "-f", "-"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                       for _ in range(48)]
            for c in clients:
                c.stdin.write(script)
                c.stdin.close()
            for c in clients:
                assert c.wait(timeout=120) == 0 and "pgn_no_such_table" in c.stderr.read()
            td.wait_closed()
    finally:
        for p in load:
            p.kill()
            p.wait()
    backends_gone(w, "pgn_many")
    assert len(pcap_connections(td.path, [w.port])) == 48
    counted, wire = role_rows(w, "pgn_many"), payload(td.path, w.port)
    assert counted == wire, {k: counted[k] - wire[k] for k in wire}
