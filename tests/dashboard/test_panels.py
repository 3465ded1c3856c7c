"""The three tiers computed from two scrapes of a mesh that served 100 requests in 10 s (built from exposition text:
no sockets), the History window, and the `moemesh top` screen."""

from __future__ import annotations

import pytest

from moemesh.dashboard import panels
from moemesh.dashboard.collector import History
from moemesh.dashboard.top_view import render

from mesh_text import mesh_snapshot


def test_tier_one_counts_only_chat_completions_and_their_errors() -> None:
    p = panels.point(mesh_snapshot(0, 100), mesh_snapshot(10, 200))
    assert p["qps"] == pytest.approx(10.0)  # health checks are not traffic
    assert p["errors"] == {"UNAVAILABLE": pytest.approx(1.0)} and p["error_rate"] == pytest.approx(0.1)
    assert p["ttft"]["p99"] == pytest.approx(0.099)
    assert p["e2e"] == {"p50": None, "p95": None, "p99": None}  # not exported here: a gap, not a zero
    assert p["tokens_per_s"]["generated"] == pytest.approx(100.0)
    assert p["queue_depth"] == 3 and p["kv_cache"] == 0.25 and p["batch_size"] is None


def test_tiers_two_and_three_per_tenant_and_per_million_tokens() -> None:
    p = panels.point(mesh_snapshot(0, 100), mesh_snapshot(10, 200))
    assert p["finish_rate"] == {"length": pytest.approx(10.0)}
    assert p["price_usd_h"] == pytest.approx(3600 * 1e-4) and p["cost_usd_h"] == pytest.approx(3600 * 2.5e-5)
    assert p["per_mtok"]["price"] == pytest.approx(1.0)  # $1e-5 per 10 tokens (cached ones are not extra tokens)
    assert p["shards"] == {"expert-0": pytest.approx(0.2)}  # busy 20% of the time; shown by service name
    assert p["satisfaction"] == {"acme": 3.5} and p["completion"] == {"acme": 0.75}
    [acme] = panels.tenant_table(mesh_snapshot(10, 200), {"acme": {"budget_usd": 10.0, "month_spent_usd": 8.0}})
    assert acme["margin_pct"] == pytest.approx(75.0) and acme["cost_per_mtok"] == pytest.approx(0.25)
    assert acme["finish"] == {"length": 200} and acme["budget_usd"] == 10.0


def test_expert_heat_map_rows_are_layers_with_imbalance() -> None:
    heat = panels.expert_heat(mesh_snapshot(0, 100))
    assert heat["layers"] == [0, 1] and heat["experts"] == 2
    assert heat["tokens"] == [[300, 100], [200, 200]] and heat["imbalance"] == [1.5, 1.0]


def test_history_keeps_a_window_spanning_snapshot_and_bounded_points() -> None:
    history = History(window_s=10, keep=5)
    assert history.add(mesh_snapshot(0, 0)) is None  # a rate needs two scrapes
    for t in range(1, 21):
        history.add(mesh_snapshot(t, 10 * t))
    points = history.points_since(0)
    assert len(points) == 5 and points[-1]["t"] == 20
    assert points[-1]["qps"] == pytest.approx(10.0)  # over the 10 s window, not since the start
    assert history.points_since(19) == points[-1:]


def test_top_screen_shows_tier_one_and_spend_against_budget() -> None:
    history = History()
    history.add(mesh_snapshot(0, 100))
    point = history.add(mesh_snapshot(10, 200))
    history.accounts = {"acme": {"budget_usd": 10.0, "month_spent_usd": 8.0, "month_held_usd": 0.0}}
    screen = render(point, history.totals(), "status.json")
    assert "QPS  10.00" in screen and "UNAVAILABLE 1.00/s" in screen and "services up 4/4" in screen
    assert "TTFT" in screen and "99 ms" in screen
    acme = next(line for line in screen.splitlines() if line.startswith("acme"))
    assert "$8.0000 / $10.00 [||||||||  ]" in acme and "75%" in acme
    assert "collecting" in render(None, History().totals())
