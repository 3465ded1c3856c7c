"""deploy/observability/: the Prometheus config and alert rules pass `promtool check`, every alert fires on the
series meant to raise it (`promtool test rules alerts_test.yml`), every Grafana panel query is valid PromQL, and the
committed Grafana JSON is what moemesh/dashboard/grafana.py generates. promtool comes from `make install`; without
it these tests fail and say so."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from moemesh.dashboard import grafana
from moemesh.dashboard.promql import PANELS

OBS = Path(__file__).resolve().parents[2] / "deploy" / "observability"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: run `make install` (apt-get install prometheus)"
    return path


def run(*args: str, cwd: Path = OBS) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_promtool_accepts_rules_and_config(promtool: str) -> None:
    assert "SUCCESS: 6 rules found" in run(promtool, "check", "rules", "alerts.yml")
    run(promtool, "check", "config", "prometheus.yml")


def test_every_alert_fires_on_its_series(promtool: str) -> None:
    run(promtool, "test", "rules", "alerts_test.yml")
    tested = {t["alertname"] for case in yaml.safe_load((OBS / "alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    defined = {r["alert"] for g in yaml.safe_load((OBS / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert tested == defined == {"MoemeshHighErrorRate", "MoemeshSlowFirstToken", "MoemeshQuotaRejections",
                                 "MoemeshTenantBudget80", "MoemeshExpertImbalance", "MoemeshShardDown"}


def test_every_panel_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool parses recording rules offline: one rule per panel query.
    rules = [{"record": f"moemesh:panel{i}_{j}", "expr": expr}
             for i, panel in enumerate(PANELS) for j, (_, expr) in enumerate(panel.queries)]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run(promtool, "check", "rules", "panels.yml", cwd=tmp_path)


def test_committed_grafana_dashboard_is_fresh_and_has_every_tier() -> None:
    committed = json.loads((OBS / "grafana-moemesh.json").read_text())
    assert committed == grafana.dashboard(), "stale: python -m moemesh.dashboard.grafana > " \
                                             "deploy/observability/grafana-moemesh.json"
    titles = [p["title"] for p in committed["panels"]]
    assert [t for t in titles if t.startswith("Tier")] == list(grafana.TIER_NAMES.values())
    for needed in ("Time to first token", "Expert heat map", "Shard balance", "Margin per tenant",
                   "Satisfaction per tenant (mean rating 1-5)"):
        assert any(t.startswith(needed) for t in titles), needed
