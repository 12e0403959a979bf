"""Network bytes per statement (pg_netstat_statements), from each backend's own TCP
counters, proven against tcpdump: per statement and per connection, exactly. The
cluster here runs without CAP_NET_RAW (the capture cannot start; statements need no
privilege) and with pg_stat_statements, whose query texts the view shows."""
import contextlib
import math
import os
import socket
import struct
import subprocess

import pytest
from conftest import CAPTURE_METHOD
from harness import (PG_MAJOR, PGBIN, Cluster, Tcpdump, free_port, out_before, pcap_payloads, pcap_retransmissions,
                     pcap_stream, pg_messages, run, wait_for)

PSQL = str(PGBIN / "psql")
MAX_STATEMENTS = 20


@pytest.fixture(scope="module")
def stmts():
    c = Cluster(free_port(), conf=["shared_preload_libraries = 'pg_netstat,pg_stat_statements'",
                                   f"pg_netstat.max_statements = {MAX_STATEMENTS}",
                                   "pg_netstat.capture_loopback = on",
                                   f"pg_netstat.capture_method = {CAPTURE_METHOD}"])
    c.start(cap_net_raw=False)
    try:
        c.sql("CREATE EXTENSION pg_netstat; CREATE EXTENSION pg_stat_statements")
        for role in ("pgn_stmt", "pgn_evict", "pgn_unix", "pgn_copy", "pgn_bench", "pgn_ext", "pgn_pipe", "pgn_live"):
            c.sql(f"CREATE ROLE {role} LOGIN")
        c.sql("CREATE TABLE pgn_copy_target (n int); GRANT INSERT ON pgn_copy_target TO pgn_copy")
        run([str(PGBIN / "pgbench"), "-i", "-q", "-s", "1", "-h", str(c.dir), "-p", str(c.port), "-U", "postgres",
             "postgres"])
        c.sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO pgn_bench")
        yield c
    finally:
        c.stop()
        c.remove()


def run_script(cluster, user, statements, host="127.0.0.1", sslmode=None):
    """Runs the statements one by one on one connection (psql sends each as its own
    Query message and waits for its result); errors do not stop the script."""
    env = dict(os.environ, PGSSLMODE=sslmode) if sslmode else None
    r = subprocess.run([PSQL, "-X", "-qAt", "-h", host, "-p", str(cluster.port), "-U", user, "-d", "postgres",
                        "-f", "-"], input="".join(s + ";\n" for s in statements),
                       capture_output=True, text=True, check=False, env=env)
    return r


def reference(path, server_port, client_port, resent=True):
    """What tcpdump saw of one connection, cut at each Query message ('Q') the client
    sent: [setup, statement 1, ...], each {'in': payload bytes, 'out': payload bytes}.
    Bytes in from one Query up to the next are that statement's; so are bytes out
    between them (psql waits for ReadyForQuery before it sends the next)."""
    parts = [dict(bytes_in=0, bytes_out=0)]
    for direction, n, first in pcap_payloads(path, server_port, client_port, resent):
        if direction == "in" and first == ord("Q"):
            parts.append(dict(bytes_in=0, bytes_out=0))
        parts[-1]["bytes_" + direction] += n
    return parts


def rows_of(cluster, role):
    cols = "kind, coalesce(queryid, 0), calls, bytes_in, bytes_out, coalesce(query, '')"
    return [dict(kind=k, queryid=int(q), calls=int(c), bytes_in=int(i), bytes_out=int(o), query=t)
            for k, q, c, i, o, t in cluster.rows(
                f"SELECT {cols} FROM pg_netstat_statements WHERE role = '{role}' ORDER BY bytes_out")]


def backend_gone(cluster, role):
    """Waits until the role's TCP backends have exited (their exit callbacks have charged
    what was left)."""
    wait_for(f"{role}'s backend to exit", lambda: cluster.sql(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND client_addr IS NOT NULL") == "0")


def query_id(cluster, statement):
    """The query id PostgreSQL gives a statement, from EXPLAIN VERBOSE over the Unix socket
    (not counted)."""
    plan = cluster.sql(f"EXPLAIN (VERBOSE, COSTS OFF) {statement}")
    return int(next(line for line in plan.splitlines() if "Query Identifier" in line).split(":")[1])


def test_each_statement_and_the_connection_equal_tcpdump_without_cap_net_raw(stmts, tmp_path):
    statements = [
        "SELECT inet_client_port()",
        "SELECT repeat('x', 3000000)",             # several MB out
        "SELECT repeat('y', 4000), 1",             # a few kB
        "SELECT 42",                                # a handful of bytes
        "COPY (SELECT generate_series(1, 20000)) TO STDOUT",
        "SELECT * FROM pgn_no_such_table",         # fails before it has a plan (no query id)
        "SELECT 1 / (random() * 0)::int",          # fails while it runs
        "SELECT 'last', 2",                         # the Terminate message goes to it
    ]
    stmts.sql("SELECT pg_netstat_reset()")
    with Tcpdump("lo", stmts.port, tmp_path) as td:
        r = run_script(stmts, "pgn_stmt", statements)
        assert "pgn_no_such_table" in r.stderr and "division by zero" in r.stderr, r.stderr
        client_port = int(r.stdout.splitlines()[0])
        td.wait_closed()
    ref = reference(td.path, stmts.port, client_port)
    assert len(ref) == len(statements) + 1, ref
    # The capture worker could not start: this is not from it.
    assert stmts.sql("SELECT DISTINCT state FROM pg_netstat_devices") == "no_permission"

    backend_gone(stmts, "pgn_stmt")
    rows = rows_of(stmts, "pgn_stmt")
    ids = {s: query_id(stmts, s) for s in statements if "pgn_no_such" not in s and not s.startswith("COPY")}
    ids["SELECT * FROM pgn_no_such_table"] = 0
    ids[statements[4]] = int(stmts.sql("SELECT queryid FROM pg_stat_statements WHERE toplevel AND query LIKE 'COPY%generate_series%'"))
    by_id = {r["queryid"]: r for r in rows if r["kind"] == "statement"}
    setup = [r for r in rows if r["kind"] == "setup"]
    assert len(setup) == 1 and setup[0]["calls"] == 1, rows
    got = [dict(bytes_in=setup[0]["bytes_in"], bytes_out=setup[0]["bytes_out"])]
    for s in statements:
        assert ids[s] in by_id, (s, rows)
        assert by_id[ids[s]]["calls"] == 1, (s, by_id[ids[s]])
        got.append(dict(bytes_in=by_id[ids[s]]["bytes_in"], bytes_out=by_id[ids[s]]["bytes_out"]))
    assert got == ref, "\n".join(f"{s:50} got {g} tcpdump {e}" for s, g, e in zip(["setup"] + statements, got, ref))
    assert len(rows) == len(statements) + 1, rows
    # The sizes are what the statements asked for.
    big = by_id[ids[statements[1]]]["bytes_out"]
    # bytes_out counts what the kernel sent again too (equal to tcpdump's above either way):
    # on a loaded host, loopback has lost segments of this result (65 kB once).
    resent = int(stmts.sql(f"SELECT retransmits FROM pg_netstat_statements WHERE role = 'pgn_stmt' AND queryid = {ids[statements[1]]}"))
    assert 3_000_000 < big and (big < 3_001_000 or resent > 0), (big, resent)
    # The text comes from pg_stat_statements.
    assert by_id[ids[statements[1]]]["query"] == "SELECT repeat($1, $2)"


class Session:
    """One psql connection over TCP that stays open between statements."""

    def __init__(self, cluster, user):
        self.p = subprocess.Popen([PSQL, "-X", "-qAt", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", user,
                                   "-d", "postgres"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, statements):
        """Runs them one by one and returns once the last has answered."""
        for s in statements:
            self.p.stdin.write(s + ";\n")
        self.p.stdin.write("SELECT 'pgn-done';\n")
        self.p.stdin.flush()
        while self.p.stdout.readline().strip() != "pgn-done":
            pass

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


def live_sums(cluster, role):
    """(bytes in, bytes out, calls) of a role's rows, and (bytes in, bytes out) of the
    latest reading of its one live connection."""
    rows = cluster.rows(f"SELECT coalesce(sum(bytes_in), 0), coalesce(sum(bytes_out), 0), coalesce(sum(calls), 0) "
                        f"FROM pg_netstat_statements WHERE role = '{role}'")
    live = cluster.rows(f"SELECT b.bytes_in, b.bytes_out FROM pg_netstat_backend_connections() b "
                        f"WHERE b.role = '{role}'")
    assert len(live) == 1, live
    return tuple(map(int, rows[0])), tuple(map(int, live[0]))


def test_a_live_connections_rows_add_up_to_its_latest_reading(stmts):
    """A backend keeps its charges for up to a second before they go to the shared table;
    the view adds them, so an open, idle connection's rows already add up to its
    backend's latest reading of its socket (the start of its latest statement: bytes in
    through its text, bytes out through the result before it). After a reset, charges
    made before it no longer count, whether they had reached the table or not."""
    role = "pgn_live"
    stmts.sql("SELECT pg_netstat_reset()")
    s = Session(stmts, role)
    try:
        # Statements of different sizes and texts, well within a second.
        s.run([f"SELECT {i}, repeat('x', {i * 300})" for i in range(12)] + ["SELECT 'a'", "SELECT 'b', 2"])
        (rin, rout, calls), (lin, lout) = live_sums(stmts, role)
        assert (rin, rout) == (lin, lout) and calls == 1 + 15, ((rin, rout, calls), (lin, lout))
        stmts.sql("SELECT pg_netstat_reset()")
        assert live_sums(stmts, role)[0] == (0, 0, 0)
        s.run(["SELECT 'after the reset'", "SELECT repeat('z', 5000)"])
        (rin2, rout2, calls2), (lin2, lout2) = live_sums(stmts, role)
        # From the reading that began 'pgn-done' on: its result and what came after.
        assert (rin2, rout2, calls2) == (lin2 - lin, lout2 - lout, 3), ((rin2, rout2, calls2), (lin2 - lin, lout2 - lout))
    finally:
        s.close()


def test_eviction_folds_into_other_and_totals_still_equal_tcpdump(stmts, tmp_path):
    # More distinct statements (different column counts: different query ids) than the table holds.
    statements = ["SELECT inet_client_port()"] + [
        "SELECT " + ", ".join(["repeat('e', 50)"] * n) for n in range(1, 3 * MAX_STATEMENTS)]
    stmts.sql("SELECT pg_netstat_reset()")
    with Tcpdump("lo", stmts.port, tmp_path) as td:
        r = run_script(stmts, "pgn_evict", statements)
        assert r.returncode == 0, r.stderr
        client_port = int(r.stdout.splitlines()[0])
        td.wait_closed()
    ref = reference(td.path, stmts.port, client_port)
    total = {k: sum(p[k] for p in ref) for k in ("bytes_in", "bytes_out")}

    def totals():
        rows = rows_of(stmts, "pgn_evict")
        return {k: sum(r[k] for r in rows) for k in ("bytes_in", "bytes_out")}
    backend_gone(stmts, "pgn_evict")
    assert totals() == total
    rows = rows_of(stmts, "pgn_evict")
    assert len(rows) <= MAX_STATEMENTS, rows
    other = [r for r in rows if r["kind"] == "other"]
    assert len(other) == 1 and other[0]["calls"] > len(statements) - MAX_STATEMENTS, rows
    # Every statement's call, and the connection's setup (a row of its own, or folded too).
    assert sum(r["calls"] for r in rows) == len(statements) + 1
    cap, used, evictions = map(int, stmts.rows(
        "SELECT max_statements, statements, evictions FROM pg_netstat_statement_table")[0])
    assert (cap, used) == (MAX_STATEMENTS, MAX_STATEMENTS) and evictions >= len(statements) - MAX_STATEMENTS


def test_unix_socket_connections_are_not_counted(stmts):
    stmts.sql("SELECT pg_netstat_reset()")
    r = run_script(stmts, "pgn_unix", ["SELECT repeat('u', 100000)"], host=str(stmts.dir))
    assert r.returncode == 0, r.stderr
    assert rows_of(stmts, "pgn_unix") == []


def test_track_statements_off_counts_nothing(stmts, tmp_path):
    stmts.sql("SELECT pg_netstat_reset()")
    r = run_script(stmts, "postgres", ["SET pg_netstat.track_statements = off", "SELECT repeat('o', 100000)"])
    assert r.returncode == 0, r.stderr
    rows = rows_of(stmts, "postgres")
    # Only the setup and the SET itself (its bytes in arrived while counting was on).
    assert all(r["bytes_out"] < 10_000 for r in rows), rows


@contextlib.contextmanager
def client_segments_lost(port, every):
    """Drops every `every`-th segment the client sends to `port` on its way into the
    server (nftables input hook on this host: after tcpdump on lo has seen it), so the
    client sends it again, as a loaded host's loopback does now and then when a backlog
    overflows."""
    table = f"pgn_stmt_loss_{port}"
    run(["nft", "add", "table", "inet", table])
    try:
        run(["nft", *f"add chain inet {table} in {{ type filter hook input priority 0 ; }}".split()])
        run(["nft", *f"add rule inet {table} in tcp dport {port} numgen inc mod {every} == 0 drop".split()])
        yield
    finally:
        run(["nft", "delete", "table", "inet", table])


@pytest.mark.parametrize("loss", [False, True], ids=["clean", "client_retransmits"])
def test_copy_from_stdin_data_is_charged_to_the_copy(stmts, tmp_path, loss):
    """The COPY's data is its own, exactly; segments the client had to send again are
    received, and counted, once (tcpdump on lo sees them twice)."""
    rows = "".join(f"{n}\n" for n in range(200_000))
    stmts.sql("SELECT pg_netstat_reset()")
    lossy = client_segments_lost(stmts.port, 7) if loss else contextlib.nullcontext()
    with Tcpdump("lo", stmts.port, tmp_path) as td, lossy:
        r = subprocess.run([PSQL, "-X", "-qAt", "-h", "127.0.0.1", "-p", str(stmts.port), "-U", "pgn_copy",
                            "-d", "postgres", "-c", "SELECT inet_client_port()",
                            "-c", "COPY pgn_copy_target FROM STDIN", "-c", "SELECT 'after'"],
                           input=rows, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        client_port = int(r.stdout.splitlines()[0])
        td.wait_closed()
    ref = reference(td.path, stmts.port, client_port)
    assert len(ref) == 4, ref
    if loss:  # the client did send segments again (the statements' own among them)
        assert pcap_retransmissions(td.path, stmts.port)[client_port][0] > 0
    backend_gone(stmts, "pgn_copy")
    copy = [x for x in rows_of(stmts, "pgn_copy") if x["query"].startswith("COPY")]
    assert len(copy) == 1, rows_of(stmts, "pgn_copy")
    assert (copy[0]["bytes_in"], copy[0]["bytes_out"]) == (ref[2]["bytes_in"], ref[2]["bytes_out"])
    assert copy[0]["bytes_in"] > len(rows)


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_each_protocol_totals_equal_tcpdump(stmts, tmp_path, mode):
    """Every byte of every connection is charged once, whatever the protocol: the role's
    rows add up to tcpdump's payload bytes, and each transaction's SELECT is one call."""
    transactions = 300
    stmts.sql("SELECT pg_netstat_reset()")
    with Tcpdump("lo", stmts.port, tmp_path) as td:
        run([str(PGBIN / "pgbench"), "-n", "-S", "-M", mode, "-c", "2", "-t", str(transactions),
             "-h", "127.0.0.1", "-p", str(stmts.port), "-U", "pgn_bench", "postgres"])
        td.wait_closed()
    ref = {"bytes_in": 0, "bytes_out": 0}
    clients = {p for d, _, p in td_clients(td.path, stmts.port)}
    for p in clients:
        for direction, n, _ in pcap_payloads(td.path, stmts.port, p):
            ref["bytes_" + direction] += n
    backend_gone(stmts, "pgn_bench")
    rows = rows_of(stmts, "pgn_bench")
    assert {k: sum(r[k] for r in rows) for k in ref} == ref, rows
    select = [r for r in rows if "pgbench_accounts" in r["query"]]
    assert len(select) == 1 and select[0]["calls"] == 2 * transactions, rows


def td_clients(path, server_port):
    from harness import pcap_packets  # noqa: F401 (same parser)
    from harness import _tcp_ports, pcap_frames
    for _, _, f in pcap_frames(path):
        ports = _tcp_ports(f)
        if ports and server_port in ports:
            yield None, None, ports[0] if ports[1] == server_port else ports[1]


def test_errors_pass_through_untouched_and_caught_errors_keep_statements_top_level(stmts, tmp_path):
    """The hooks let PostgreSQL's errors through as they are (an error re-raised by Rust
    code would lose its location, constraint name and more), and an error caught in a
    PL/pgSQL EXCEPTION block, deep in nested statements, leaves the next statement
    top-level."""
    stmts.sql("SELECT pg_netstat_reset()")
    statements = [
        "SELECT inet_client_port()",
        "DO $$ BEGIN PERFORM 1 / (random() * 0)::int; EXCEPTION WHEN division_by_zero THEN NULL; END $$",
        "SELECT repeat('n', 5000), 2, 3",
        "CREATE TEMP TABLE pgn_checked (n int CONSTRAINT pgn_positive CHECK (n > 0))",
        "INSERT INTO pgn_checked VALUES (-1)",
    ]
    r = subprocess.run([PSQL, "-X", "-qAt", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1", "-p", str(stmts.port),
                        "-U", "postgres", "-d", "postgres", "-f", "-"],
                       input="".join(s + ";\n" for s in statements), capture_output=True, text=True, check=False)
    assert "LOCATION:  ExecConstraints, execMain.c" in r.stderr, r.stderr
    backend_gone(stmts, "postgres")
    rows = rows_of(stmts, "postgres")
    n = [x for x in rows if x["query"] == "SELECT repeat($1, $2), $3, $4"]
    assert len(n) == 1 and n[0]["calls"] == 1 and 5000 < n[0]["bytes_out"] < 5200, rows


# What the TLS test runs, once in plain text and once under TLS: results of very
# different sizes, COPY, failures. The first names the client port for tcpdump.
TLS_SCRIPT = [
    "SELECT inet_client_port()",
    "SELECT repeat('t', 3000000)",             # several MB out
    "SELECT repeat('k', 4000), 1",             # a few kB
    "SELECT 7",                                 # a handful of bytes
    "COPY (SELECT generate_series(1, 20000)) TO STDOUT",
    "SELECT * FROM pgn_no_such_table",         # fails before it has a plan
    "SELECT 1 / (random() * 0)::int",          # fails while it runs
    "SELECT 'last', 2",
]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A cluster with ssl = on and a self-signed certificate made here; plain-text
    connections (sslmode=disable) are still allowed (pg_hba "host" lines)."""
    c = Cluster(free_port(), conf=["shared_preload_libraries = 'pg_netstat,pg_stat_statements'", "ssl = on",
                                   "ssl_min_protocol_version = 'TLSv1.3'",  # the record overhead below
                                   "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"])
    c.make_certificate()
    c.start(cap_net_raw=False)
    try:
        c.sql("CREATE EXTENSION pg_netstat; CREATE EXTENSION pg_stat_statements")
        for role in ("pgn_plain", "pgn_tls"):
            c.sql(f"CREATE ROLE {role} LOGIN")
        yield c
    finally:
        c.stop()
        c.remove()


def turns(path, server_port, client_port, resent=True):
    """What tcpdump saw of one connection, cut where the client speaks after the server
    (it waits for each result before it sends the next statement, so under TLS, where
    the Query messages cannot be read, each statement is one turn): [{'bytes_in',
    'bytes_out'}, ...]. The first turns are the TLS handshake and the startup; the last
    is the client's Terminate and TLS close, and the server's close: one turn, or two when
    the server's close_notify left before the client's arrived (the client's then ends
    the capture, with nothing out after it, and joins the turn before)."""
    parts, last = [], None
    for direction, n, _ in pcap_payloads(path, server_port, client_port, resent):
        if not parts or (direction == "in" and last == "out"):
            parts.append(dict(bytes_in=0, bytes_out=0))
        parts[-1]["bytes_" + direction] += n
        last = direction
    if len(parts) > 1 and parts[-1]["bytes_out"] == 0:
        parts[-2]["bytes_in"] += parts.pop()["bytes_in"]
    return parts


def script_rows(cluster, role, statements):
    """[setup, statement 1, ...] of one role's connection that ran `statements` once
    each, as {'bytes_in', 'bytes_out'}; the query ids from EXPLAIN, 0 for the statement
    on a missing table, the COPY's from pg_stat_statements."""
    rows = rows_of(cluster, role)
    by_id = {r["queryid"]: r for r in rows if r["kind"] == "statement"}
    setup = [r for r in rows if r["kind"] == "setup"]
    assert len(setup) == 1 and setup[0]["calls"] == 1, rows
    assert len(rows) == len(statements) + 1, rows
    got = [dict(bytes_in=setup[0]["bytes_in"], bytes_out=setup[0]["bytes_out"])]
    for s in statements:
        if "pgn_no_such" in s:
            qid = 0
        elif s.startswith("COPY"):
            qid = int(cluster.sql("SELECT DISTINCT queryid FROM pg_stat_statements WHERE toplevel "
                                  "AND query LIKE 'COPY%generate_series%'"))
        else:
            qid = query_id(cluster, s)
        assert qid in by_id and by_id[qid]["calls"] == 1, (s, rows)
        got.append(dict(bytes_in=by_id[qid]["bytes_in"], bytes_out=by_id[qid]["bytes_out"]))
    return got


def test_tls_connection_equals_tcpdump_and_statements_pay_the_record_overhead(tls, tmp_path):
    """Under TLS the rows of a connection add up to tcpdump's payload bytes, exactly, and
    each statement is exact too, cut at the client's turns (TLS hides the Query
    messages). Against the same script in plain text, a statement pays TLS 1.3's 22 bytes
    (5 of record header, 1 of inner content type, 16 of AEAD tag) per record, one record
    per write of PostgreSQL's 8 kB send buffer, and the setup the handshake."""
    n = len(TLS_SCRIPT)
    tls.sql("SELECT pg_netstat_reset()")
    with Tcpdump("lo", tls.port, tmp_path) as td:
        plain = run_script(tls, "pgn_plain", TLS_SCRIPT, sslmode="disable")
        secure = run_script(tls, "pgn_tls", TLS_SCRIPT, sslmode="require")
        for r in (plain, secure):
            assert "pgn_no_such_table" in r.stderr and "division by zero" in r.stderr, r.stderr
        ports = {"plain": int(plain.stdout.splitlines()[0]), "tls": int(secure.stdout.splitlines()[0])}
        td.wait_closed()
    # The TLS run began with an SSLRequest (8 bytes) that the server accepted ('S', 1 byte).
    first = [(d, nbytes, b) for d, nbytes, b in pcap_payloads(td.path, tls.port, ports["tls"])][:2]
    assert first == [("in", 8, 0), ("out", 1, ord("S"))], first
    backend_gone(tls, "pgn_plain")
    backend_gone(tls, "pgn_tls")
    got = {"plain": script_rows(tls, "pgn_plain", TLS_SCRIPT), "tls": script_rows(tls, "pgn_tls", TLS_SCRIPT)}
    names = ["setup"] + TLS_SCRIPT
    # Plain text: exact per statement, cut at the Query messages.
    ref_plain = reference(td.path, tls.port, ports["plain"])
    assert got["plain"] == ref_plain, "\n".join(f"{s:50} got {g} tcpdump {e}"
                                                for s, g, e in zip(names, got["plain"], ref_plain))
    # TLS: the connection's rows add up to tcpdump's payload bytes, in and out.
    total = {"bytes_in": 0, "bytes_out": 0}
    for direction, nbytes, _ in pcap_payloads(td.path, tls.port, ports["tls"]):
        total["bytes_" + direction] += nbytes
    assert {k: sum(g[k] for g in got["tls"]) for k in total} == total, got["tls"]
    # ... and per statement, cut at the turns: the last n + 1 turns are the statements
    # and the exit (charged to the last statement), the ones before them the setup.
    t = turns(td.path, tls.port, ports["tls"])
    assert len(t) > n + 1, t
    ref_tls = [{k: sum(p[k] for p in t[:-(n + 1)]) for k in total}] + t[-(n + 1):-2] + [
        {k: t[-2][k] + t[-1][k] for k in total}]
    assert got["tls"] == ref_tls, "\n".join(f"{s:50} got {g} tcpdump {e}"
                                            for s, g, e in zip(names, got["tls"], ref_tls))
    # The overhead per statement, against the plain run: 22 bytes a record, a record
    # for each flush of PostgreSQL's 8 kB send buffer (an error and the ReadyForQuery
    # after it are flushed apart); the last statement's out has the server's
    # close_notify (24 bytes), its in the Terminate's record and the client's close_notify.
    # Compared on what each run wrote, each byte once: on lo a large result is now and
    # then sent again, which the rows rightly count (checked above) but TLS does not cause.
    once = {"plain": reference(td.path, tls.port, ports["plain"], resent=False)}
    t = turns(td.path, tls.port, ports["tls"], resent=False)
    once["tls"] = [{k: sum(p[k] for p in t[:-(n + 1)]) for k in total}] + t[-(n + 1):-2] + [
        {k: t[-2][k] + t[-1][k] for k in total}]
    report = []
    for i, (name, p, s) in enumerate(zip(names, once["plain"], once["tls"])):
        extra = s["bytes_out"] - p["bytes_out"]
        report.append(f"{name:52} plain {p['bytes_out']:>9} tls {s['bytes_out']:>9} +{extra:>6} "
                      f"x{s['bytes_out'] / max(p['bytes_out'], 1):.4f} "
                      f"in plain {p['bytes_in']:>5} tls {s['bytes_in']:>5}")
        if i == 0:
            continue
        close = 24 if i == n else 0
        records, rest = divmod(extra - close, TLS_RECORD)
        # At most 16 kB in a record; on PostgreSQL 15 and 16 a record per flush of 8 kB.
        fewest = math.ceil(p["bytes_out"] / (8192 if PG_MAJOR < 17 else 16384))
        assert rest == 0 and 0 < fewest <= records <= math.ceil(p["bytes_out"] / 8192) + 1, report[-1]
        assert s["bytes_in"] - p["bytes_in"] == TLS_RECORD + (TLS_RECORD + 24 if i == n else 0), report[-1]
    print("\n".join(report))
    big = once["tls"][2]["bytes_out"] / once["plain"][2]["bytes_out"]
    assert 1 < big <= 1 + TLS_RECORD / 8192 + 1e-5, big
    # The setup carries the handshake: the certificate, the RSA signature, key shares,
    # session tickets; and the client's hello and key share.
    der = len(subprocess.run(["openssl", "x509", "-in", str(tls.dir / "data" / "server.crt"), "-outform", "DER"],
                             check=True, capture_output=True).stdout)
    setup_out = got["tls"][0]["bytes_out"] - got["plain"][0]["bytes_out"]
    setup_in = got["tls"][0]["bytes_in"] - got["plain"][0]["bytes_in"]
    assert der + 256 < setup_out < der + 2048, (der, report[0])
    assert 300 < setup_in < 2048, report[0]


# TLS 1.3 (AES-GCM or ChaCha20-Poly1305): 5 bytes of record header, 1 of inner content
# type, 16 of AEAD tag.
TLS_RECORD = 22


class Wire:
    """A protocol-3 client on a raw socket, to say exactly which messages go in which
    write: `write(*messages)` sends them in one send() and, unless told not to, reads
    the answer up to ReadyForQuery."""

    def __init__(self, port, user):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        self.buf = bytearray()
        params = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
        self.sock.sendall(struct.pack(">II", 8 + len(params), 196608) + params)
        self.until_ready()

    @staticmethod
    def msg(kind, body=b""):
        return kind + struct.pack(">I", len(body) + 4) + body

    @classmethod
    def parse(cls, sql, name=""):
        return cls.msg(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack(">H", 0))

    @classmethod
    def bind(cls, name=""):
        return cls.msg(b"B", b"\0" + name.encode() + b"\0" + struct.pack(">HHH", 0, 0, 0))

    DESCRIBE = msg.__func__(b"D", b"P\0")
    EXECUTE = msg.__func__(b"E", b"\0" + struct.pack(">I", 0))
    SYNC = msg.__func__(b"S")

    def write(self, *messages):
        self.sock.sendall(b"".join(messages))
        return self.until_ready()

    def until_ready(self):
        kinds = []
        while True:
            while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack(">I", self.buf[1:5])[0]:
                chunk = self.sock.recv(1 << 20)
                assert chunk, f"the server closed after {kinds}"
                self.buf += chunk
            n = 1 + struct.unpack(">I", self.buf[1:5])[0]
            kinds.append(chr(self.buf[0]))
            del self.buf[:n]
            if kinds[-1] == "Z":
                return kinds

    def close(self):
        self.sock.sendall(self.msg(b"X"))
        self.sock.close()


def test_extended_protocol_each_statement_equals_tcpdump(stmts, tmp_path):
    """Parse/Bind/Execute per statement, exactly as docs/statements.md says: a statement
    starts at the Bind that starts its executor (at the Execute of a utility statement,
    at the error of one that fails in Parse); the bytes in from its first message on are
    its own (a Parse sent on its own before the Bind included), the bytes out from its
    boundary on (the answer to a Parse sent on its own is the previous statement's). A
    named statement bound again with Bind alone is a call of the same row. Checked
    against tcpdump's streams, cut at those messages."""
    P, B, D, E, S = Wire.parse, Wire.bind, Wire.DESCRIBE, Wire.EXECUTE, Wire.SYNC
    stmts.sql("SELECT pg_netstat_reset()")
    with Tcpdump("lo", stmts.port, tmp_path, snaplen=0) as td:
        w = Wire(stmts.port, "pgn_ext")
        # (label, the messages of each write, index in this statement's messages of its
        # first message and of its boundary); one statement may take several writes.
        plan = [
            ("big", [[P("SELECT repeat('a', 1000000)"), B(), D, E, S]], "P", "B"),
            ("kB", [[P("SELECT repeat('b', 4000), 1, 2"), B(), D, E, S]], "P", "B"),
            ("utility", [[P("SHOW work_mem"), B(), D, E, S]], "P", "E"),
            ("named", [[P("SELECT repeat('c', 100000), 1, 2, 3", "pgn_named"), S], [B("pgn_named"), D, E, S]],
             "P", "B"),
            ("named", [[B("pgn_named"), E, S]], "B", "B"),
            ("failing", [[P("SELECT * FROM pgn_no_such_table"), S]], "P", "P"),
            ("named", [[B("pgn_named"), E, S]], "B", "B"),
            ("small", [[P("SELECT 42, 1, 2, 3, 4"), B(), D, E, S]], "P", "B"),
        ]
        answers = [w.write(*messages) for _, writes, _, _ in plan for messages in writes]
        assert ["E" in a for a in answers] == [i == 6 for i in range(len(answers))], answers
        w.close()
        td.wait_closed(expect=[w.port])
    st = pcap_stream(td.path, stmts.port, w.port)
    cmsgs = pg_messages(st["in_"], True)
    smsgs = pg_messages(st["out"], cmsgs)
    sent = [m for _, writes, _, _ in plan for ws in writes for m in ws] + [Wire.msg(b"X")]
    assert [t for t, _, _ in cmsgs] == ["startup"] + [chr(m[0]) for m in sent], cmsgs
    # Where each statement begins (in) and where its boundary is (out), as stream offsets.
    cuts, i = [], 1
    for label, writes, first, boundary in plan:
        msgs = cmsgs[i:i + sum(len(ws) for ws in writes)]
        i += len(msgs)
        start = next(off for t, off, _ in msgs if t == first)
        cuts.append((label, start, out_before(st, next(off for t, off, _ in msgs if t == boundary))))
    ref = {"setup": dict(bytes_in=cuts[0][1], bytes_out=cuts[0][2])}
    ends = [(c[1], c[2]) for c in cuts[1:]] + [(len(st["in_"]), out_before(st, len(st["in_"])))]
    for (label, a, b), (a2, b2) in zip(cuts, ends):
        r = ref.setdefault(label, dict(bytes_in=0, bytes_out=0, calls=0))
        r["bytes_in"] += a2 - a
        r["bytes_out"] += b2 - b
        r["calls"] += 1
    # The same totals as the kernel counts them (every copy out, each byte in once).
    total = {"bytes_in": 0, "bytes_out": 0}
    for direction, nbytes, _ in pcap_payloads(td.path, stmts.port, w.port):
        total["bytes_" + direction] += nbytes
    assert total == {"bytes_in": len(st["in_"]), "bytes_out": out_before(st, len(st["in_"]))}
    assert smsgs[-1][0] == "Z"
    backend_gone(stmts, "pgn_ext")
    rows = rows_of(stmts, "pgn_ext")
    texts = {"SELECT repeat($1, $2)": "big", "SELECT repeat($1, $2), $3, $4": "kB", "SHOW work_mem": "utility",
             "SELECT repeat($1, $2), $3, $4, $5": "named", "SELECT $1, $2, $3, $4, $5": "small"}
    got = {}
    for r in rows:
        label = "setup" if r["kind"] == "setup" else "failing" if r["queryid"] == 0 else texts[r["query"]]
        got[label] = dict(bytes_in=r["bytes_in"], bytes_out=r["bytes_out"], calls=r["calls"])
    ref["setup"]["calls"] = 1
    assert got == ref, "\n".join(f"{k:8} got {got.get(k)} tcpdump {ref[k]}" for k in ref)
    assert {k: sum(g[k] for g in got.values()) for k in total} == total
    assert got["named"]["calls"] == 3 and got["big"]["bytes_out"] > 1_000_000


# A pipeline of statements of different sizes, in this order (pgbench script).
PIPELINE = [
    ("tiny", "SELECT 1, 2", "SELECT $1, $2"),
    ("big", "SELECT repeat('p', 30000)", "SELECT repeat($1, $2)"),
    ("kB", "SELECT repeat('q', 5000), 1, 2, 3", "SELECT repeat($1, $2), $3, $4, $5"),
    ("last", "SELECT 'x', 'y', 'z', 'w', 'v'", "SELECT $1, $2, $3, $4, $5"),
]
# PostgreSQL's send buffer (PQ_SEND_BUFFER_SIZE): output waits there until it is full,
# or until a Sync (the end of a pipeline) flushes it.
SEND_BUFFER = 8192


def pipeline_reference(st, labels):
    """Each statement's own bytes in a pgbench pipeline (extended protocol, P/B/D/E per
    statement, one Sync at the end), from the protocol messages of one connection's
    streams: in, its Parse, Bind, Describe and Execute; out, ParseComplete, BindComplete,
    RowDescription, DataRow and CommandComplete. The Sync and its ReadyForQuery, and the
    Terminate, go to the last statement; before the first Parse and up to the first
    ReadyForQuery, the setup. Also: the in-bytes of each whole pipeline (a list)."""
    cmsgs = pg_messages(st["in_"], True)
    smsgs = pg_messages(st["out"], cmsgs)
    ref = {k: dict(bytes_in=0, bytes_out=0) for k in ["setup"] + [label for label, _, _ in PIPELINE]}
    current, pipelines = "setup", []
    for t, off, n in cmsgs:
        if t == "P":
            sql = st["in_"][off + 6:st["in_"].index(b"\0", off + 6)].decode()
            current = labels[sql.strip().rstrip(";")]
            if current == PIPELINE[0][0]:
                pipelines.append(0)
        if pipelines and t in "PBDES":
            pipelines[-1] += n
        ref[current]["bytes_in"] += n
    order = [label for label, _, _ in PIPELINE]
    k, ready = None, False
    for t, off, n in smsgs:
        if not ready:
            ref["setup"]["bytes_out"] += n
            ready = t == "Z"
            continue
        k = 0 if k is None else k
        label = order[min(k, len(order) - 1)] if t != "Z" else order[-1]
        ref[label]["bytes_out"] += n
        if t == "C":
            k += 1
        elif t == "Z":
            k = None
        else:
            assert t in "12TD", (t, off)
    return ref, pipelines


def test_pipelined_statements_are_charged_as_documented(stmts, tmp_path):
    """pgbench pipelines (\\startpipeline ... \\endpipeline, extended protocol): the
    connection's rows add up to tcpdump exactly. Per statement, as docs/statements.md
    says: the whole pipeline arrives in one write, so its first statement is charged all
    its bytes in; out, each statement is charged what PostgreSQL flushed while it was
    current, which differs from its own results (from the protocol messages in tcpdump's
    streams) by less than the 8 kB send buffer per call."""
    transactions = 50
    script = tmp_path / "pipeline.sql"
    script.write_text("\\startpipeline\n" + "".join(sql + ";\n" for _, sql, _ in PIPELINE) + "\\endpipeline\n")
    stmts.sql("SELECT pg_netstat_reset()")
    with Tcpdump("lo", stmts.port, tmp_path, snaplen=0) as td:
        run([str(PGBIN / "pgbench"), "-n", "-M", "extended", "-c", "1", "-t", str(transactions), "-f", str(script),
             "-h", "127.0.0.1", "-p", str(stmts.port), "-U", "pgn_pipe", "postgres"])
        td.wait_closed()
    labels = {sql: label for label, sql, _ in PIPELINE}
    ref = {k: dict(bytes_in=0, bytes_out=0) for k in ["setup"] + list(labels.values())}
    pipelines, total = [], {"bytes_in": 0, "bytes_out": 0}
    for port in {p for _, _, p in td_clients(td.path, stmts.port)}:
        st = pcap_stream(td.path, stmts.port, port)
        r, p = pipeline_reference(st, labels)
        pipelines += p
        for k in ref:
            for d in ("bytes_in", "bytes_out"):
                ref[k][d] += r[k][d]
        for direction, nbytes, _ in pcap_payloads(td.path, stmts.port, port):
            total["bytes_" + direction] += nbytes
    assert len(pipelines) == transactions, pipelines
    # (Equal unless the server had to send something again: own results count it once.)
    assert sum(r["bytes_in"] for r in ref.values()) == total["bytes_in"]
    backend_gone(stmts, "pgn_pipe")
    texts = {normalized: label for label, _, normalized in PIPELINE}
    got = {}
    for r in rows_of(stmts, "pgn_pipe"):
        label = "setup" if r["kind"] == "setup" else texts[r["query"]]
        got[label] = r
    assert all(got[label]["calls"] == transactions for label in labels.values()), got
    # The connection: exact.
    assert {d: sum(g[d] for g in got.values()) for d in total} == total, got
    assert {d: got["setup"][d] for d in total} == ref["setup"]
    report = [f"{k:6} calls {got[k]['calls']:>3}  in got {got[k]['bytes_in']:>7} own {ref[k]['bytes_in']:>7}"
              f"  out got {got[k]['bytes_out']:>8} own {ref[k]['bytes_out']:>8}"
              f" error/call {(got[k]['bytes_out'] - ref[k]['bytes_out']) / got[k]['calls']:>+9.1f}"
              for k in ref]
    print("\n".join(report))
    # In: the first statement has each whole pipeline; the last the Terminate (5 bytes).
    first, last = PIPELINE[0][0], PIPELINE[-1][0]
    assert got[first]["bytes_in"] == sum(pipelines), report
    assert got[last]["bytes_in"] == 5, report
    assert all(got[k]["bytes_in"] == 0 for k in labels.values() if k not in (first, last)), report
    # Out: each statement but the last is charged the send buffer's flushes while it was
    # current, whole buffers (the socket sends at once on lo); the last, what is left at
    # the Sync. Off by less than the send buffer per call either way.
    for k in labels.values():
        assert abs(got[k]["bytes_out"] - ref[k]["bytes_out"]) < SEND_BUFFER * transactions, report
        if k != last and PG_MAJOR < 17:  # 17 writes a message larger than the buffer directly
            assert got[k]["bytes_out"] % SEND_BUFFER == 0, report
