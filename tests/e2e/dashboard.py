"""The Grafana dashboard (docs/grafana-dashboard.json) and the metrics the exporter's
queries file defines, for the dashboard tests in test_docs.py and test_prometheus.py, and
the dashboard's conventions (convention_problems)."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
QUERIES = ROOT / "monitoring" / "postgres_exporter_queries.yaml"
# Grafana's variables, replaced by what Grafana would send for the query to be plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$server": ".+"}


def metric_usages():
    """{metric name: COUNTER or GAUGE} the exporter makes of the queries file:
    <family>_<column> for every column that is not a label."""
    usages, family = {}, None
    for line in QUERIES.read_text().splitlines():
        if m := re.match(r"^(\w+):\s*$", line):
            family = m.group(1)
        elif (m := re.match(r'^\s+- (\w+): \{usage: "(\w+)"', line)) and m.group(2) != "LABEL":
            usages[f"{family}_{m.group(1)}"] = m.group(2)
    return usages


def exported_metrics():
    """Metric names the exporter makes of the queries file."""
    return set(metric_usages())


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


def panels():
    """The dashboard's panels, rows left out."""
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def convention_problems():
    """What breaks the dashboard's conventions, as sentences (none: all is well). Every
    panel and query uses the datasource variable; every metric a panel queries is filtered
    by the server variable; range vectors (rate, increase) are taken of counters only,
    over $__rate_interval; panels lie on the 24-column grid without overlapping."""
    problems, usages, cells = [], metric_usages(), {}
    for p in panels():
        title = p["title"]
        for where in [p, *p["targets"]]:
            if where.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                problems.append(f"{title}: datasource is not the ${{datasource}} variable")
        for t in p["targets"]:
            for name, braces, rng in re.findall(r"\b(pg_netstat_\w+)(\{[^}]*\})?(\[[^\]]*\])?", t["expr"]):
                if 'server=~"$server"' not in braces:
                    problems.append(f"{title}: {name} is not filtered by server=~\"$server\"")
                if rng and usages.get(name) != "COUNTER":
                    problems.append(f"{title}: {name} is a {usages.get(name)}, not a counter, under {rng}")
                if rng and rng != "[$__rate_interval]":
                    problems.append(f"{title}: {name}{rng}: use [$__rate_interval]")
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            problems.append(f"{title}: off the 24-column grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"{title}: overlaps {cells[x, y]}")
                    break
                cells[x, y] = title
            else:
                continue
            break
    return problems
