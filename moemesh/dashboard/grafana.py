"""The Grafana dashboard JSON of deploy/observability/ from moemesh/dashboard/promql.py (one source for the panels).

    python -m moemesh.dashboard.grafana > deploy/observability/grafana-moemesh.json

tests/dashboard/test_observability_files.py fails when the committed file is stale."""

from __future__ import annotations

import json
import sys

from moemesh.dashboard.promql import PANELS, Panel

TIER_NAMES = {1: "Tier 1: service health", 2: "Tier 2: business quality", 3: "Tier 3: cost and utilization"}
WIDTH, HEIGHT = 8, 8  # Grafana's grid is 24 wide: three panels per row


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict:
    table = panel.kind == "table"
    targets = [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "instant": table,
                "range": not table, **({"format": "table"} if table else {}),
                "datasource": {"type": "prometheus", "uid": "${datasource}"}}
               for i, (legend, expr) in enumerate(panel.queries)]
    return {"id": pid, "type": panel.kind, "title": panel.title, "gridPos": {"x": x, "y": y, "w": WIDTH, "h": HEIGHT},
            "datasource": {"type": "prometheus", "uid": "${datasource}"}, "targets": targets,
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []}}


def dashboard() -> dict:
    panels, y, pid = [], 0, 1
    for tier, name in TIER_NAMES.items():
        panels.append({"id": pid, "type": "row", "title": name, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, panel in enumerate(p for p in PANELS if p.tier == tier):
            panels.append(_panel(panel, pid, (i % 3) * WIDTH, y + (i // 3) * HEIGHT))
            pid += 1
        y += HEIGHT * -(-sum(p.tier == tier for p in PANELS) // 3)
    return {
        "title": "moemesh", "uid": "moemesh-three-tiers", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["moemesh"], "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "panels": panels,
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
    }


if __name__ == "__main__":
    json.dump(dashboard(), sys.stdout, indent=1)
    sys.stdout.write("\n")
