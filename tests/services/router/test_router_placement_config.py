"""Placement validation and the router/expert config parsing (no sockets)."""

from __future__ import annotations

import pytest

from moemesh.runtime.types import ExpertPlacement
from moemesh.serving.config import ConfigError
from services.expert.config import ExpertConfig
from services.router.config import RouterConfig
from services.router.placement import Placement, PlacementError


def shard(addr: str, experts, layers=(0, 1)) -> ExpertPlacement:
    return ExpertPlacement(addr, tuple(layers), tuple(experts))


def test_complete_placement_passes_and_owner_is_unique():
    p = Placement((shard("a:1", range(0, 4)), shard("b:1", range(4, 8))))
    p.validate((0, 1), 8)
    assert p.owner(1, 5) == [1] and p.shards_for_layer(0) == [0, 1]


def test_missing_experts_are_named_with_what_to_do():
    p = Placement((shard("a:1", range(0, 4)), shard("b:1", [4, 5], layers=(0,))))
    with pytest.raises(PlacementError) as info:
        p.validate((0, 1), 8)
    msg = str(info.value)
    assert "layer 0: experts 6-7" in msg and "layer 1: experts 4-7" in msg
    assert "EXPERT_ADDRS" in msg and "b:1 hosts experts 4-5 of layers 0" in msg


def test_doubly_hosted_and_out_of_range_experts_are_errors():
    with pytest.raises(PlacementError, match="more than one shard: layer 0: experts 2-3"):
        Placement((shard("a:1", range(0, 4), (0,)), shard("b:1", range(2, 4), (0,)))).validate((0,), 4)
    with pytest.raises(PlacementError, match="expert ids >= num_experts 4: b:1"):
        Placement((shard("a:1", range(0, 4), (0,)), shard("b:1", [9], (0,)))).validate((0,), 4)
    with pytest.raises(PlacementError, match="no expert shards"):
        Placement(()).validate((0,), 4)


def test_router_config_reads_expert_addrs_from_env():
    cfg = RouterConfig.from_args([], env={"EXPERT_ADDRS": "e0:50055, e1:50055", "MOEMESH_MODEL": "m",
                                          "MOEMESH_ROUTER_KV_BLOCKS": "64"})
    assert cfg.expert_addrs == ("e0:50055", "e1:50055") and cfg.model == "m" and cfg.kv_blocks == 64
    assert RouterConfig.from_args(["--expert-addrs", "x:1"], env={"EXPERT_ADDRS": "e0:50055"}).expert_addrs == ("x:1",)


@pytest.mark.parametrize("env, text", [
    ({"EXPERT_ADDRS": "e0"}, "'e0' is not an address"),
    ({"EXPERT_ADDRS": "e0:1,e0:1"}, "lists a shard twice"),
    ({"MOEMESH_ROUTER_DTYPE": "float64"}, "'float64' is not one of"),
    ({"MOEMESH_ROUTER_KV_BLOCKS": "0"}, "KV_BLOCKS: 0 must be >= 1"),
    ({"MOEMESH_ROUTER_DEVICE": "tpu"}, "'tpu' is not cpu"),
])
def test_router_config_errors_quote_the_value(env, text):
    with pytest.raises(ConfigError, match=text):
        RouterConfig.from_args([], env=env)


def test_expert_config_split_and_explicit_lists():
    cfg = ExpertConfig.from_args([], env={"MOEMESH_EXPERT_SHARD_INDEX": "1", "MOEMESH_EXPERT_NUM_SHARDS": "2"})
    assert (cfg.shard_index, cfg.num_shards, cfg.expert_list()) == (1, 2, None)
    assert ExpertConfig.from_args(["--experts", "0-2,7"], env={}).expert_list() == (0, 1, 2, 7)


@pytest.mark.parametrize("argv, text", [
    (["--shard-index", "2", "--num-shards", "2"], "2 is not in 0..1"),
    (["--num-shards", "0"], "0 must be >= 1"),
    (["--experts", "3-1"], "'3-1' is not a non-empty range"),
    (["--experts", "a"], "'a' is not an expert id"),
    (["--experts", "1,0-2"], "lists an expert twice"),
])
def test_expert_config_errors_quote_the_value(argv, text):
    with pytest.raises(ConfigError, match=text):
        ExpertConfig.from_args(argv, env={})


def test_shards_of_different_models_are_named_with_their_experts():
    from services.router.placement import check_same_model

    with pytest.raises(PlacementError, match=r"different models: a:1 serves 'm1' in float32 \(experts 0-3\); "
                                             r"b:1 serves 'm2' in float32 \(experts 4-7\)"):
        check_same_model([("a:1", "m1", "float32", (0, 1, 2, 3)), ("b:1", "m2", "float32", (4, 5, 6, 7))])
    check_same_model([("a:1", "m1", "float32", (0, 1)), ("b:1", "m1", "float32", (2, 3))])


def test_declared_replicas_pass_validation_and_split_their_slots_evenly():
    import torch

    from services.router.placement import ReplicaSplit

    p = Placement((shard("a:1", [0, 1, 2]), shard("b:1", [2, 3])))
    with pytest.raises(PlacementError, match="more than one shard: layer 0: experts 2"):
        p.validate((0, 1), 4)
    p.validate((0, 1), 4, replicas=True)
    split = ReplicaSplit.of(p, 4)
    assert split is not None and ReplicaSplit.of(Placement((shard("a:1", [0, 1]), shard("b:1", [2, 3]))), 4) is None
    ids = torch.tensor([[2, 0]] * 100 + [[3, -1]])  # [T, K]
    assigned = split.assign(1, ids)
    assert assigned[:100, 1].eq(0).all() and assigned[100].tolist() == [1, -1]  # single owners, unused slot
    assert assigned[:100, 0].bincount().tolist() == [50, 50]  # expert 2's tokens halved between its replicas
    only_ids, only_w = split.only(assigned, 1, ids, torch.ones(101, 2))
    assert (only_ids[:100, 0] == 2).sum() == 50 and only_ids[:100, 1].eq(-1).all() and only_w.sum() == 51
