"""Monitoring on the whole mesh (`moemesh up` on the tiny MoE, real sockets, one mesh for the module) under traffic
from three tenants: the dashboard's JSON holds all three tiers, a real Prometheus configured from
deploy/observability/ scrapes the mesh (every Grafana panel query answers, the alert rules load and the 80%-budget
alert fires), headless Chromium shows charts that hold data, and `moemesh top` prints tier 1 and the tenants' spend.

Prometheus and Chromium come from `make install`; when absent these tests fail and say so (they do not skip).
MOEMESH_SCREENSHOTS_DIR=docs keeps the browser screenshots (docs/dashboard-*.png)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import browser
import prometheus_server
from mesh_harness import ROOT, RunningMesh
from metering_harness import wait_for
from monitoring_traffic import Traffic

from moemesh.dashboard.promql import PANELS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MESH_UP_ARGS = ["--dashboard-port", "0"]


@pytest.fixture(scope="module")
def traffic(mesh: RunningMesh):
    with Traffic(mesh) as running:
        yield running


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def _latest(mesh: RunningMesh) -> dict:
    points = _get(mesh.status["dashboard"] + "api/points")["points"]
    return points[-1] if points else {}


def _tenants(mesh: RunningMesh) -> dict[str, dict]:
    return {row["tenant"]: row for row in _get(mesh.status["dashboard"] + "api/totals")["tenants"]}


def test_dashboard_json_holds_all_three_tiers(mesh: RunningMesh, traffic: Traffic) -> None:
    assert mesh.status["dashboard"].startswith("http://127.0.0.1:")  # local only by default: no admin key
    assert "dashboard_key" not in mesh.status
    wait_for(lambda: _latest(mesh).get("qps", 0) > 0 and _latest(mesh)["ttft"]["p99"] is not None, 120,
             "dashboard QPS and TTFT")
    wait_for(lambda: all(_tenants(mesh).get(t, {}).get("satisfaction") for t in ("acme", "globex", "initech")), 120,
             "satisfaction of every tenant")
    wait_for(lambda: _latest(mesh).get("errors"), 60, "an error code on the error-rate chart")
    p, rows = _latest(mesh), _tenants(mesh)
    assert p["tokens_per_s"]["generated"] > 0 and p["e2e"]["p50"] > 0 and p["itl"]["p50"] is not None
    assert set(p["shards"]) == {"expert-0", "expert-1"} and all(v > 0 for v in p["shards"].values())
    assert p["cpu"]["router"] > 0 and p["router_busy"] is not None
    acme = rows["acme"]
    assert acme["price_usd"] > acme["cost_usd"] > 0
    # $1 per million tokens, less the prefix cache's discount: cached prompt tokens pay a quarter of that.
    assert 0.25 * 0.99 <= acme["price_per_mtok"] <= 1.0 * 1.01
    assert acme["budget_usd"] == pytest.approx(0.0003) and acme["task_completion"] is not None
    heat = _get(mesh.status["dashboard"] + "api/totals")["experts"]
    assert heat["layers"] == [0, 1] and heat["experts"] == 4 and sum(map(sum, heat["tokens"])) > 0


def test_prometheus_scrapes_the_mesh_and_every_panel_query_answers(mesh: RunningMesh, traffic: Traffic,
                                                                    tmp_path: Path) -> None:
    why = prometheus_server.missing()
    assert why is None, why
    config = prometheus_server.config_for(mesh.status["dashboard"], tmp_path)
    prom = prometheus_server.Prometheus(config, tmp_path)
    try:
        prom.wait_ready()
        wait_for(lambda: len(prom.query('up{service=~"expert-.*"} == 1')) == 2, 60, "both shards scraped")
        wait_for(lambda: prom.query("moemesh_expert_tokens_total"), 60, "the router's expert counts")
        experts = {(s["metric"]["layer"], s["metric"]["expert"]) for s in prom.query("moemesh_expert_tokens_total")}
        assert experts == {(str(layer), str(e)) for layer in range(2) for e in range(4)}
        wait_for(lambda: prom.query('rate(moemesh_batcher_time_to_first_token_seconds_count[10s]) > 0'), 60,
                 "TTFT observations in Prometheus")
        for panel in PANELS:  # the Grafana dashboard's queries: valid PromQL over the mesh's real series
            for _, expr in panel.queries:
                prom.query(expr)
        # rate() needs two scrapes of the gateway's counter: the gateway may have been scraped once so far
        wait_for(lambda: prom.query(PANELS[0].queries[0][1]), 30, "the gateway's QPS series")
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
        wait_for(lambda: any(a["labels"]["alertname"] == "MoemeshTenantBudget80" and a["labels"]["tenant"] == "acme"
                             for a in prom.api("alerts")["alerts"]), 120, "the 80%-budget alert of acme")
    finally:
        prom.stop()


def test_chromium_shows_charts_holding_data(mesh: RunningMesh, traffic: Traffic, tmp_path: Path) -> None:
    why = browser.missing()
    assert why is None, why
    wait_for(lambda: _latest(mesh).get("errors") and _tenants(mesh).get("acme", {}).get("satisfaction"), 120,
             "errors and feedback to show")
    keep = os.environ.get("MOEMESH_SCREENSHOTS_DIR")
    time.sleep(60 if keep else 5)  # more seconds of points: the lines have some length (a minute for docs/)
    shot = tmp_path / "dashboard.png"
    points, text = browser.chart_points(mesh.status["dashboard"], shot, min_charts=14)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    empty = [card for card, n in points.items() if n == 0]
    assert not empty, f"charts without data: {empty}"
    assert len(points) == 16  # 15 charts and the heat map
    for tenant in ("acme", "globex", "initech"):
        assert tenant in text
    if keep:
        shutil.copy(shot, Path(keep) / "dashboard-under-load.png")


def test_top_prints_tier_one_and_tenants_spend(mesh: RunningMesh, traffic: Traffic) -> None:
    out = subprocess.run([sys.executable, "-m", "moemesh.cli.main", "top", "--status-file", str(mesh.status_path),
                          "--iterations", "3", "--interval", "1"], cwd=ROOT, env=mesh.env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    last = out.stdout.split("moemesh top")[-1]
    assert "QPS" in last and "TTFT" in last and "services up 8/8" in last
    assert "acme" in last and "globex" in last and "$" in last
