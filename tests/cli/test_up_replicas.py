"""`moemesh up --routers N`: which processes the plan starts and how they are wired (no processes started here;
tests/e2e/test_mesh_replicas.py runs the mesh)."""

from __future__ import annotations

import argparse

import pytest

from moemesh.cli import up, up_replicas


def _ns(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.register(parser.add_subparsers())
    return parser.parse_args(["up", *args])


def test_plan_wires_each_batcher_to_its_router_and_the_gateway_to_every_batcher(tmp_path):
    children = up.plan(_ns("--routers", "3"), tmp_path)
    routers = sorted(n for n in children if n.startswith("router"))
    batchers = sorted(n for n in children if n.startswith("batcher"))
    assert routers == ["router", "router-1", "router-2"] and batchers == ["batcher", "batcher-1", "batcher-2"]
    kinds = {n: n.split("-")[0].upper() for n in children}
    address = {n: f"127.0.0.1:{c.env[f'MOEMESH_{kinds[n]}_PORT']}" for n, c in children.items() if n != "gateway"}
    for router, batcher in up_replicas.names(3):
        assert children[batcher].env["ROUTER_ADDR"] == address[router]
        # every router attaches to every shard
        assert children[router].env["EXPERT_ADDRS"] == f"{address['expert-0']},{address['expert-1']}"
    assert children["gateway"].env["BATCHER_ADDR"] == ",".join(address[b] for _, b in up_replicas.names(3))
    assert len(set(address.values())) == len(address)  # one port each


def test_one_router_plans_as_before_even_after_a_bigger_plan(tmp_path):
    up.plan(_ns("--routers", "2"), tmp_path)  # leaves router-1 in up.SERVICES
    children = up.plan(_ns(), tmp_path)
    assert not [n for n in children if n.endswith("-1") and not n.startswith("expert")]
    assert children["gateway"].env["BATCHER_ADDR"] == children["router"].env["BATCHER_ADDR"]
    assert "," not in children["gateway"].env["BATCHER_ADDR"]


def test_bad_router_counts_are_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--routers 0"):
        up.plan(_ns("--routers", "0"), tmp_path)
    with pytest.raises(ValueError, match="--routers 2 needs expert shard processes"):
        up.plan(_ns("--routers", "2", "--expert-shards", "0"), tmp_path)


def test_stop_waves_put_every_replica_beside_replica_0():
    children = dict.fromkeys(["gateway", "batcher", "batcher-1", "router", "router-1", "tokenizer"])
    waves = up_replicas.stop_waves([["gateway"], ["batcher"], ["router", "tokenizer"]], children)
    assert waves == [["gateway"], ["batcher", "batcher-1"], ["router", "tokenizer", "router-1"]]


def test_printout_lists_every_replica():
    ready = {n: {"address": f"h:{i}"} for i, n in enumerate(["router", "batcher", "router-1", "batcher-1"])}
    replicas = up_replicas.status(ready, 2, {"router": {"expert-0": "shm"}, "router-1": {"expert-0": "shm"}})
    text = "\n".join(up_replicas.lines(replicas))
    assert "replicas: 2" in text and "router-1 h:2, batcher-1 h:3; experts: expert-0 shm" in text
    assert up_replicas.lines(replicas[:1]) == []


def test_routers_spread_over_gpus_only_with_several_gpus():
    assert up_replicas.device_env("router-1", "cuda", 2) == {"MOEMESH_ROUTER_DEVICE": "cuda:1"}
    assert up_replicas.device_env("router", "cuda", 2) == {"MOEMESH_ROUTER_DEVICE": "cuda:0"}
    assert up_replicas.device_env("router-2", "cuda", 2) == {"MOEMESH_ROUTER_DEVICE": "cuda:0"}
    assert up_replicas.device_env("router-1", "cuda", 1) == {}
    assert up_replicas.device_env("router-1", "cpu", 0) == {}
    assert up_replicas.device_env("batcher-1", "cuda", 2) == {}
