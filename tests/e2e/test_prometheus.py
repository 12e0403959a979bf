"""The monitoring path end to end: prometheus-postgres-exporter with
monitoring/postgres_exporter_queries.yaml against the test cluster, Prometheus scraping the
exporter on loopback, and PromQL answers through Prometheus' HTTP API equal to the views."""

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import INTERVAL
from dashboard import metric_names, plain_promql, queries
from harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ROOT / "monitoring" / "postgres_exporter_queries.yaml"

pytestmark = pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("prometheus-postgres-exporter")),
                                reason="prometheus and prometheus-postgres-exporter are installed by scripts/setup")


def promql(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return {tuple(sorted((k, v) for k, v in s["metric"].items() if k not in ("__name__", "instance", "job", "server"))):
            int(float(s["value"][1])) for s in body["data"]["result"]}


def api(port, path, **params):
    url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def view(cluster, sql):
    return {tuple(r[:-1]): int(r[-1]) for r in cluster.rows(sql)}


def test_prometheus_reports_the_views(cluster, tmp_path):
    # Some traffic of a role of its own, then quiet: the figures must stand still so the
    # scraped values can be compared with the views exactly.
    cluster.sql("DROP ROLE IF EXISTS pgn_prom; CREATE ROLE pgn_prom LOGIN")
    for _ in range(3):
        cluster.sql("SELECT repeat('p', 50000)", user="pgn_prom", host="127.0.0.1")
    devices_sql = "SELECT device, capture_method, state, bytes_in FROM pg_netstat_devices"
    roles_sql = "SELECT coalesce(role, ''), bytes_out FROM pg_netstat_roles"

    def settled():
        a = (view(cluster, devices_sql), view(cluster, roles_sql))
        # The span the figures must stand still over (longer than an interval plus the
        # packet wait, so a publication would show), not a guess at when they settle.
        time.sleep(INTERVAL + 1.5)
        return a if a == (view(cluster, devices_sql), view(cluster, roles_sql)) else None
    wait_for("the figures to settle", settled, timeout=60, every=0)

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
        for p in (prom, exporter):
            p.terminate()
            p.wait(timeout=20)
        cluster.sql("DROP ROLE IF EXISTS pgn_prom")
