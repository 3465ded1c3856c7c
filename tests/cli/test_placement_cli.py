"""`moemesh placement` (EPLB-style plan from observed load, file written) and `moemesh up --placement /
--expert-transport` (what each child gets), without starting processes."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from moemesh.cli import up
from moemesh.cli.main import main
from moemesh.runtime import placement_plan
from services.expert.config import ExpertConfig
from tests.cli.test_up_gpu_flags import _ns

# 2 layers x 8 experts; expert 0 is hot in both layers (4x the others).
PROM = "\n".join(
    ["# TYPE moemesh_expert_tokens_total counter"]
    + [f'moemesh_expert_tokens_total{{layer="{layer}",expert="{e}"}} {400 if e == 0 else 100}'
       for layer in (1, 3) for e in range(8)]) + "\n"


def _run(tmp_path, source: str, *extra: str) -> dict:
    out = tmp_path / "placement.json"
    assert main(["placement", "--from-metrics", source, "--shards", "4", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_placement_from_prometheus_text_replicates_the_hot_expert(tmp_path, capsys):
    metrics = tmp_path / "metrics.txt"
    metrics.write_text(PROM)
    doc = _run(tmp_path, str(metrics), "--replicas", "3", "--global")
    shards = doc["shards"]
    assert sum(e == 0 for s in shards for e in s) == 4  # the hot expert on every shard
    assert sorted(e for s in shards for e in s if e) == list(range(1, 8))  # the others once each
    # Summed over the layers expert 0 has 800 tokens, the others 200: shard 0 (experts 0, 1) holds 1000 of 2200.
    assert doc["before"]["max_over_mean"] == pytest.approx(1000 / 550)
    assert doc["after"]["max_over_mean"] == pytest.approx(600 / 550)  # 200 of expert 0 + two others, or one
    assert "max/mean shard load, mean over layers: 1.818 (contiguous split) -> 1.091" in capsys.readouterr().out
    placement_plan.read(tmp_path / "placement.json")  # what `moemesh up --placement` accepts


def test_placement_from_router_info_json_and_http(tmp_path):
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"expertTokens": [{"layer": 1, "tokens": ["10", "90", "10", "10"]}]}))
    assert sum(e == 1 for s in _run(tmp_path, str(info), "--replicas", "1")["shards"] for e in s) == 2

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = PROM.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        doc = _run(tmp_path, f"http://127.0.0.1:{server.server_port}/metrics")  # default: one replica per shard
    finally:
        server.shutdown()
    assert sum(len(s) for s in doc["shards"]) == 8 + 4


def test_placement_errors_name_the_problem(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["placement", "--from-metrics", str(empty), "--shards", "2", "--out", str(tmp_path / "p")]) == 1
    assert "no moemesh_expert_tokens_total" in capsys.readouterr().err
    with pytest.raises(placement_plan.PlacementFileError, match="--shards 9 must be in 1..8"):
        placement_plan.plan([1.0] * 8, 9)


def test_per_layer_plans_follow_each_layers_hot_expert(tmp_path):
    metrics = tmp_path / "metrics.txt"
    metrics.write_text("\n".join(f'moemesh_expert_tokens_total{{layer="{layer}",expert="{e}"}} '
                                 f'{800 if e == hot else 100}' for layer, hot in ((0, 0), (1, 5)) for e in range(8)))
    doc = _run(tmp_path, str(metrics), "--replicas", "3")  # per layer: the default
    layers = placement_plan.read_layers(tmp_path / "placement.json")
    assert [sum(e == 0 for s in layers[0] for e in s), sum(e == 5 for s in layers[1] for e in s)] == [4, 4]
    assert doc["after"]["max_over_mean"] < 1.2 < doc["before"]["max_over_mean"]


def test_plan_balances_a_skewed_load_better_than_the_contiguous_split():
    weights = [float(w) for w in (800, 400, 200, 100, 50, 50, 50, 50)]
    shards = placement_plan.plan(weights, 4, replicas=4)
    before = placement_plan.imbalance(placement_plan.shard_loads(weights, placement_plan.contiguous(8, 4)))
    after = placement_plan.imbalance(placement_plan.shard_loads(weights, shards))
    assert before > 2.0 and after < 1.2
    assert all(len(set(s)) == len(s) for s in shards)  # never two replicas of one expert on a shard
    assert placement_plan.plan(weights, 4, replicas=0) != placement_plan.contiguous(8, 4)  # packing alone helps


def test_up_passes_the_placement_and_transport_to_the_children(tmp_path):
    path = tmp_path / "placement.json"
    placement_plan.write(path, [[0, 1, 2], [2, 3]], 4, "test", {0: [1.0] * 4})
    children = up.plan(_ns(placement=path, expert_transport="shm"), tmp_path)
    assert sorted(n for n in children if n.startswith("expert-")) == ["expert-0", "expert-1"]
    router = children["router"].env
    assert router["MOEMESH_ROUTER_PLACEMENT"] == str(path) and router["MOEMESH_ROUTER_EXPERT_TRANSPORT"] == "shm"
    experts = [ExpertConfig.from_args([], env=children[f"expert-{i}"].env).expert_list() for i in (0, 1)]
    assert experts == [(0, 1, 2), (2, 3)]
    assert "MOEMESH_EXPERT_PLACEMENT" not in children["expert-0"].env  # a global file: --experts is enough
    placement_plan.write(path, [[0, 1, 2, 3], [0, 2, 3]], 4, "test", {0: [1.0] * 4, 1: [1.0] * 4},
                         {0: [[0, 1, 2], [2, 3]], 1: [[1, 3], [0, 2, 3]]})
    shard1 = ExpertConfig.from_args([], env=up.plan(_ns(placement=path), tmp_path)["expert-1"].env)
    assert (shard1.placement, shard1.shard_index) == (str(path), 1)  # per layer: the shard reads its entries
    with pytest.raises(ValueError, match="--expert-shards 3 disagrees with --placement"):
        up.plan(_ns(placement=path, expert_shards=3), tmp_path)
    path.write_text('{"version": 1, "num_experts": 4, "shards": [[0, 1], [3]]}')
    with pytest.raises(placement_plan.PlacementFileError, match=r"experts \[2\] are hosted by no shard"):
        up.plan(_ns(placement=path), tmp_path)


def test_up_without_the_flag_leaves_the_transport_to_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEMESH_ROUTER_EXPERT_TRANSPORT", raising=False)
    assert "MOEMESH_ROUTER_EXPERT_TRANSPORT" not in up.plan(_ns(), tmp_path)["router"].env
    monkeypatch.setenv("MOEMESH_ROUTER_EXPERT_TRANSPORT", "dist")
    assert up.plan(_ns(), tmp_path)["router"].env["MOEMESH_ROUTER_EXPERT_TRANSPORT"] == "dist"
    assert up.plan(_ns(expert_transport="grpc"), tmp_path)["router"].env["MOEMESH_ROUTER_EXPERT_TRANSPORT"] == "grpc"


def test_the_printout_names_the_requested_and_the_chosen_transports(monkeypatch):
    from moemesh.cli.data_plane import transport_line

    monkeypatch.delenv("MOEMESH_ROUTER_EXPERT_TRANSPORT", raising=False)
    line = transport_line(None, {"expert-1": "shm", "expert-0": "shm"})
    assert line == "  expert transport: expert-0 shm, expert-1 shm (--expert-transport auto)"
    assert transport_line("dist", {"expert-0": "gloo"}).endswith("expert-0 gloo (--expert-transport dist)")
    assert transport_line(None, {}, shards=0).endswith("the experts run in the router process (--expert-shards 0)")
    assert transport_line(None, {}).endswith("unknown (--expert-transport auto)")  # shards that did not answer
