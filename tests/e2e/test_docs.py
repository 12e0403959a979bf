"""The documentation against the real thing: every ```sql block in README.md and
docs/*.md runs against the test cluster (the examples a DBA copies must work with the
views as they are); the Grafana dashboard names only exported metrics; the chart script
plots the view's own rows."""

import json
import re
from pathlib import Path

import pytest

from harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path, i, block) for path in DOCS
          for i, block in enumerate(re.findall(r"```sql\n(.*?)```", path.read_text(), re.S))]


def test_the_docs_have_sql_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("path,i,block", BLOCKS, ids=[f"{p.name}#{i}" for p, i, _ in BLOCKS])
def test_sql_example_runs(cluster, path, i, block):
    # Over TCP, so the connection views have at least this connection in them.
    cluster.sql(block, host="127.0.0.1")


def test_the_grafana_dashboard_uses_only_exported_metrics():
    """The dashboard is valid JSON, every panel queries something, and every metric a
    query names is one the exporter's queries file defines (test_prometheus.py then
    runs each query against a real Prometheus)."""
    from dashboard import DASHBOARD, exported_metrics, metric_names, queries

    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metrics()
    assert len(exported) >= 20 and "pg_netstat_device_bytes_in" in exported
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for title, expr in queries():
        named = metric_names(expr)
        assert named, f"{title}: {expr} names no pg_netstat metric"
        assert named <= exported, f"{title}: {sorted(named - exported)} are not exported"


def test_the_chart_script_plots_the_view(cluster, tmp_path):
    """scripts/chart plot (which made docs/traffic.png with `scripts/chart capture`) draws
    the view's own rows: its CSV is rows of pg_netstat_intervals, and the PNG is real."""
    import csv
    import subprocess

    cluster.sql("SELECT repeat('c', 30000)", host="127.0.0.1")
    wait_for("an interval with traffic on lo", lambda: int(cluster.sql(
        "SELECT count(*) FROM pg_netstat_intervals WHERE device = 'lo' AND bytes_out > 30000")) > 0, timeout=20)
    out = tmp_path / "lo.png"
    subprocess.run([str(ROOT / "scripts" / "chart"), "plot", "--host", str(cluster.dir), "--port", str(cluster.port),
                    "--device", "lo", str(out)], check=True, capture_output=True, text=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with open(out.with_suffix(".csv")) as f:
        plotted = [(r["device"], int(r["ts"]), int(r["bytes_in"]), int(r["bytes_out"])) for r in csv.DictReader(f)]
    # Closed intervals do not change; newer ones may have closed since the chart was made,
    # pushing the oldest out of the history (60 rows per device).
    in_view = {(d, int(ts), int(i), int(o)) for d, ts, i, o in cluster.rows(
        "SELECT device, extract(epoch FROM ts)::bigint, bytes_in, bytes_out FROM pg_netstat_intervals "
        "WHERE device = 'lo'")}
    oldest = min(ts for _, ts, _, _ in in_view)
    still_kept = {p for p in plotted if p[1] >= oldest}
    assert len(still_kept) > len(plotted) // 2 and still_kept <= in_view
    assert any(o > 30000 for _, _, _, o in plotted)
    assert {d for d, *_ in plotted} == {"lo"}
