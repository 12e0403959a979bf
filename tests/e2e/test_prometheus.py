"""The monitoring path end to end: prometheus-postgres-exporter with
monitoring/postgres_exporter_queries.yaml against the test cluster, Prometheus scraping the
exporter on loopback, and PromQL answers through Prometheus' HTTP API equal to the views;
the Grafana dashboard's queries against that Prometheus."""

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from dashboard import convention_problems, metric_names, panels, plain_promql, queries
from harness import free_port, quiesce, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ROOT / "monitoring" / "postgres_exporter_queries.yaml"

needs_prometheus = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("prometheus-postgres-exporter")),
    reason="prometheus and prometheus-postgres-exporter are installed by scripts/setup")


def promql(port, query, value=lambda v: int(float(v))):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return {tuple(sorted((k, v) for k, v in s["metric"].items() if k not in ("__name__", "instance", "job", "server"))):
            value(s["value"][1]) for s in body["data"]["result"]}


def api(port, path, **params):
    url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def view(cluster, sql):
    return {tuple(r[:-1]): int(r[-1]) for r in cluster.rows(sql)}


def start_monitoring(cluster, tmp_path):
    """Starts prometheus-postgres-exporter with the queries file, connected over the Unix
    socket (which pg_netstat_statements does not count), and a Prometheus scraping it every
    second; returns Prometheus' port and a function that stops both."""
    exporter_port, prom_port = free_port(), free_port()
    env = dict(os.environ, DATA_SOURCE_NAME=f"host={cluster.dir} port={cluster.port} user=postgres dbname=postgres "
                                            "sslmode=disable")
    exporter = subprocess.Popen(["prometheus-postgres-exporter", f"--extend.query-path={QUERIES}",
                                 f"--web.listen-address=127.0.0.1:{exporter_port}", "--disable-settings-metrics"],
                                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "exporter.log", "w"))
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: pg_netstat\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))

    def stop():
        for p in (prom, exporter):
            p.terminate()
            p.wait(timeout=20)
    return prom_port, stop


def test_the_dashboard_follows_its_conventions():
    """The datasource and server variables everywhere, rates of counters only and over
    $__rate_interval, no overlapping panels (static: needs no Prometheus)."""
    assert convention_problems() == []


@needs_prometheus
def test_prometheus_reports_the_views(cluster, tmp_path):
    # Some traffic of a role of its own, then quiet: the figures must stand still so the
    # scraped values can be compared with the views exactly.
    cluster.sql("DROP ROLE IF EXISTS pgn_prom; CREATE ROLE pgn_prom LOGIN")
    for _ in range(3):
        cluster.sql("SELECT repeat('p', 50000)", user="pgn_prom", host="127.0.0.1")
    devices_sql = "SELECT device, capture_method, state, bytes_in FROM pg_netstat_devices"
    roles_sql = "SELECT coalesce(role, ''), bytes_out FROM pg_netstat_roles"
    egress_sql = ("SELECT peer_class, coalesce(backend_type, ''), coalesce(bytes_out, 0), coalesce(socket_bytes_out, 0) "
                  "FROM pg_netstat_egress")
    # The figures stand still from here on: every connection has ended, its backend
    # exited, and the interval it ended in is published.
    quiesce(cluster)

    prom_port, stop = start_monitoring(cluster, tmp_path)
    try:
        want_devices = view(cluster, devices_sql)
        want_roles = view(cluster, roles_sql)
        assert ("pgn_prom",) in want_roles

        def scraped():
            try:
                d = promql(prom_port, "pg_netstat_device_bytes_in")
                r = promql(prom_port, "pg_netstat_role_bytes_out")
            except OSError:
                return None
            return (d, r) if d and r else None
        wait_for("Prometheus to have scraped the exporter", scraped, timeout=60, every=0.5)
        d, r = scraped()
        assert d == {(("capture_method", m), ("device", dev), ("state", s)): v
                     for (dev, m, s), v in want_devices.items()}, (d, want_devices)
        # Prometheus drops a label whose value is empty: the row of unclaimed connections
        # (role NULL in the view, '' from the exporter) is the series without a role label.
        assert r == {((("role", role),) if role else ()): v for (role,), v in want_roles.items()}, (r, want_roles)
        # The other families are there too.
        assert promql(prom_port, 'pg_netstat_database_connections{database="postgres"}')
        # Egress by peer class and backend type, both sources, as the view has them.
        rows = cluster.rows(egress_sql)
        want_out = {((("backend_type", b),) if b else ()) + (("peer_class", c),): int(o) for c, b, o, _ in rows}
        want_socket = {((("backend_type", b),) if b else ()) + (("peer_class", c),): int(s) for c, b, _, s in rows}
        assert ("loopback", "client backend") in {(c, b) for c, b, _, _ in rows}, rows
        assert promql(prom_port, "pg_netstat_egress_bytes_out") == want_out
        assert promql(prom_port, "pg_netstat_egress_socket_bytes_out") == want_socket

        # The Grafana dashboard: every metric it names exists in Prometheus, every query
        # is PromQL Prometheus accepts, and the server variable finds this server.
        in_prometheus = set(api(prom_port, "label/__name__/values"))
        for title, expr in queries():
            assert metric_names(expr) <= in_prometheus, (title, sorted(metric_names(expr) - in_prometheus))
            if not expr.startswith("label_values("):
                api(prom_port, "query", query=plain_promql(expr))
        assert api(prom_port, "label/server/values", **{"match[]": "pg_netstat_device_bytes_in"})
        states = api(prom_port, "query", query=plain_promql(dict(queries())["Capture state"]))["result"]
        assert {(s["metric"]["device"], s["metric"]["state"]) for s in states} == {
            (dev, st) for dev, _, st in want_devices}
    finally:
        stop()
        cluster.sql("DROP ROLE IF EXISTS pgn_prom")


# The statement families: the exporter's top rows per database (the 20 in the queries file).
TOP = 20
COUNTERS = ("calls", "bytes_in", "bytes_out", "segments_in", "segments_out", "retransmits")
STATEMENTS_DB = "pgn_prom_stmts"
STATEMENT_PANELS = ("Top statements by egress", "Bytes per call, top statements",
                    "Statement egress per role and database", "Statement table fill",
                    "Statement table evictions per second")


def statement_rows(cluster):
    """pg_netstat_statements' rows of the test's database:
    {(role, kind, queryid or ''): {counter: value}}."""
    return {(role, kind, qid): dict(zip(COUNTERS, map(int, values))) for role, kind, qid, *values in cluster.rows(
        f"SELECT role, kind, coalesce(queryid::text, ''), {', '.join(COUNTERS)} FROM pg_netstat_statements "
        f"WHERE database = '{STATEMENTS_DB}'")}


def scraped_statements(port, family="pg_netstat_statement"):
    """The exporter's series of the test's database through PromQL, keyed like
    statement_rows (the all family: by role). Empty labels are absent in Prometheus."""
    out = {}
    for counter in COUNTERS:
        for labels, v in promql(port, f'{family}_{counter}{{database="{STATEMENTS_DB}"}}').items():
            labels = dict(labels)
            key = labels["role"] if family.endswith("_all") else (
                labels["role"], labels["kind"], labels.get("queryid", ""))
            out.setdefault(key, {})[counter] = v
    return out


@needs_prometheus
def test_prometheus_reports_the_top_statements(cluster, tmp_path):
    """Statements of two roles over TCP, a big and a small result each, among more
    statements than the exporter's top 20 of a database holds: the exported series equal
    pg_netstat_statements for each statement, the cut is by bytes out, the per-role sums
    cover what the top leaves out, and the dashboard's statement panels have series."""
    big, small = "SELECT repeat('b', 200000)", "SELECT 42"
    roles = ("pgn_prom_a", "pgn_prom_b", "pgn_prom_many")
    cluster.sql(f"DROP DATABASE IF EXISTS {STATEMENTS_DB}")
    cluster.sql(f"CREATE DATABASE {STATEMENTS_DB}")
    for role in roles:
        cluster.sql(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN")

    def run_as(role, statements):
        # One TCP connection, a Query message per statement; done when its backend has
        # exited (the exit charges what was left).
        cluster.sql("".join(s + ";\n" for s in statements), user=role, host="127.0.0.1", dbname=STATEMENTS_DB)
        wait_for(f"{role}'s backend to exit", lambda: cluster.sql(
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND client_addr IS NOT NULL") == "0")

    run_as("pgn_prom_a", [big] * 3 + [small] * 30)
    run_as("pgn_prom_b", [big] + [small] * 25)
    # 22 statements of different query ids (1 to 22 columns), each smaller than 25 small
    # ones: with the three setup rows more rows than the top holds, cut among these.
    run_as("pgn_prom_many", ["SELECT " + ", ".join(["1"] * k) for k in range(1, 23)])
    want = statement_rows(cluster)
    assert len(want) > TOP, want
    ours = {k: v for k, v in want.items() if k[0] != "pgn_prom_many" and k[1] == "statement"}
    assert sorted((k[0], v["calls"]) for k, v in ours.items()) == [
        ("pgn_prom_a", 3), ("pgn_prom_a", 30), ("pgn_prom_b", 1), ("pgn_prom_b", 25)], ours

    prom_port, stop = start_monitoring(cluster, tmp_path)
    try:
        def scraped():
            try:
                got = (scraped_statements(prom_port), scraped_statements(prom_port, "pg_netstat_statement_all"),
                       promql(prom_port, f'pg_netstat_statement_query_info{{database="{STATEMENTS_DB}"}}'))
            except OSError:
                return None
            # A scrape lands whole, but the counters are asked for one after another: the
            # first may have been asked just before the scrape that holds them all landed.
            complete = all(set(row) == set(COUNTERS) for family in got[:2] for row in family.values())
            return got if all(got) and complete else None
        try:
            top, per_role, info = wait_for("Prometheus to have scraped the statement families", scraped,
                                           timeout=60, every=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\nexporter log:\n{(tmp_path / 'exporter.log').read_text()[-3000:]}")

        # The top 20 by bytes out, each series equal to its row of the view.
        assert len(top) == TOP, sorted(top)
        assert {k: want[k] for k in top} == top
        assert min(want[k]["bytes_out"] for k in top) >= max(
            v["bytes_out"] for k, v in want.items() if k not in top), (sorted(top), want)
        assert set(ours) <= set(top), (sorted(ours), sorted(top))
        # The per-role sums hold every row, top or not: sums stay right.
        assert per_role == {role: {c: sum(v[c] for k, v in want.items() if k[0] == role) for c in COUNTERS}
                            for role in roles}, per_role
        rest = promql(prom_port, f'sum(pg_netstat_statement_all_bytes_out{{database="{STATEMENTS_DB}"}}) - '
                                 f'sum(pg_netstat_statement_bytes_out{{database="{STATEMENTS_DB}"}})')
        assert rest == {(): sum(v["bytes_out"] for k, v in want.items() if k not in top)} != {(): 0}, rest
        # One info series per top row (no query label: no pg_stat_statements here).
        assert {(dict(k)["role"], dict(k)["kind"], dict(k).get("queryid", "")) for k in info} == set(top)
        # The statement table (gauges read as integers).
        [[max_statements, in_use]] = cluster.rows("SELECT max_statements, statements FROM pg_netstat_statement_table")
        assert promql(prom_port, "pg_netstat_statement_table_max_statements") == {(): int(max_statements)}
        assert promql(prom_port, "pg_netstat_statement_table_statements") == {(): int(in_use)}
        assert promql(prom_port, "pg_netstat_statement_table_evictions")

        # More of the big statement while Prometheus watches: its series follows the
        # view, and the dashboard's statement panels (rates over the last minute) show it.
        run_as("pgn_prom_a", [big] * 2)
        key = next(k for k in ours if k[0] == "pgn_prom_a" and ours[k]["calls"] == 3)
        want_big = statement_rows(cluster)[key]
        assert want_big["calls"] == 5, want_big
        wait_for("the big statement's new figures in Prometheus",
                 lambda: scraped_statements(prom_port).get(key) == want_big, timeout=30, every=0.5)
        exprs, by_title = dict(queries()), {p["title"]: p for p in panels()}
        for title in STATEMENT_PANELS:
            assert title in by_title, f"no panel {title!r} in the dashboard"
            for t in by_title[title]["targets"]:
                result = api(prom_port, "query", query=plain_promql(t["expr"]))["result"]
                assert result, (title, t["expr"])
        top_panel = api(prom_port, "query", query=plain_promql(exprs["Top statements by egress"]))["result"]
        first = max(top_panel, key=lambda s: float(s["value"][1]))["metric"]
        assert (first["role"], first["database"], first["kind"], first["queryid"]) == (
            "pgn_prom_a", STATEMENTS_DB, "statement", key[2]), top_panel
        # Bytes per call over the window: the two new calls' bytes out over two, as the
        # view counts them (with any segment the kernel sent again: on a busy lo a part
        # of a 200 kB result now and then is, 4,159 bytes in one fresh-clone run).
        per_call = promql(prom_port, plain_promql(exprs["Bytes per call, top statements"]), value=float)
        labels = (("database", STATEMENTS_DB), ("kind", "statement"), ("queryid", key[2]), ("role", "pgn_prom_a"))
        two_calls = (want_big["bytes_out"] - ours[key]["bytes_out"]) / 2
        assert two_calls > 200_000 and abs(per_call[labels] - two_calls) < 1, (per_call, two_calls)
    finally:
        stop()
        cluster.sql(f"DROP DATABASE IF EXISTS {STATEMENTS_DB}")
        for role in roles:
            cluster.sql(f"DROP ROLE IF EXISTS {role}")
