"""Every ```sql block in README.md and docs/*.md runs against the test cluster: the
examples a DBA copies from the docs must work with the views as they are."""

import json
import re
from pathlib import Path

import pytest

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
