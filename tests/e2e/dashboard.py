"""The Grafana dashboard (docs/grafana-dashboard.json) and the metrics the exporter's
queries file defines, for the dashboard tests in test_docs.py and test_prometheus.py."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
QUERIES = ROOT / "monitoring" / "postgres_exporter_queries.yaml"
# Grafana's variables, replaced by what Grafana would send for the query to be plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$server": ".+"}


def exported_metrics():
    """Metric names the exporter makes of the queries file: <family>_<column> for every
    column that is not a label."""
    names, family = set(), None
    for line in QUERIES.read_text().splitlines():
        if m := re.match(r"^(\w+):\s*$", line):
            family = m.group(1)
        elif (m := re.match(r'^\s+- (\w+): \{usage: "(\w+)"', line)) and m.group(2) != "LABEL":
            names.add(f"{family}_{m.group(1)}")
    return names


def queries():
    """(panel title, PromQL) of every panel's targets and of the query variables."""
    d = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["definition"]) for v in d["templating"]["list"] if v["type"] == "query"]
    return out


def plain_promql(expr):
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr):
    return set(re.findall(r"\bpg_netstat_\w+", expr))
