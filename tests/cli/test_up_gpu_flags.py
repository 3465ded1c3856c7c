"""`moemesh up --device/--dtype/--expert-shards/--load-format`: how many shard processes, and what each gets."""

from __future__ import annotations

import argparse

import pytest

from moemesh.cli import up
from moemesh.cli.data_plane import expert_shard_count, service_env


def test_shard_count_defaults_and_override():
    assert expert_shard_count("cpu", None, 0) == 2  # CPU default: two shard processes
    assert expert_shard_count("cuda", None, 1) == 0  # one GPU: experts co-located in the router
    assert expert_shard_count("cuda", None, 4) == 4  # one shard per GPU
    assert expert_shard_count("cuda", 2, 1) == 2  # forced shard processes on one GPU
    with pytest.raises(ValueError, match="-1"):
        expert_shard_count("cpu", -1, 0)


def test_service_env_places_shards_on_gpus():
    env = service_env("EXPERT", 3, 4, "cuda", "bfloat16", "dummy", visible_gpus=2)
    assert env["MOEMESH_EXPERT_DEVICE"] == "cuda:1" and env["MOEMESH_EXPERT_NUM_SHARDS"] == "4"
    assert env["MOEMESH_EXPERT_LOAD_FORMAT"] == "dummy" and env["MOEMESH_EXPERT_DTYPE"] == "bfloat16"
    assert service_env("EXPERT", 1, 2, "cuda", "bfloat16", "auto", visible_gpus=1)["MOEMESH_EXPERT_DEVICE"] == "cuda"
    assert service_env("ROUTER", 0, 2, "cuda", "bfloat16", "auto", 1)["MOEMESH_ROUTER_DEVICE"] == "cuda"
    assert service_env("BATCHER", 0, 2, "cuda", "bfloat16", "auto", 1) == {}


def _ns(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.register(parser.add_subparsers())
    return parser.parse_args(["up", *[a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]])


@pytest.mark.parametrize("shards", [0, 1, 3])
def test_plan_starts_the_requested_shards(tmp_path, shards):
    children = up.plan(_ns(expert_shards=shards, dtype="bfloat16", load_format="dummy"), tmp_path)
    experts = sorted(n for n in children if n.startswith("expert-"))
    assert experts == [f"expert-{i}" for i in range(shards)]
    router = children["router"].env
    assert len([a for a in router["EXPERT_ADDRS"].split(",") if a]) == shards
    assert router["MOEMESH_ROUTER_DTYPE"] == "bfloat16" and router["MOEMESH_ROUTER_LOAD_FORMAT"] == "dummy"
    for name in experts:
        assert children[name].env["MOEMESH_EXPERT_NUM_SHARDS"] == str(shards)


def test_plan_cpu_default_keeps_two_shards(tmp_path):
    children = up.plan(_ns(), tmp_path)
    assert sorted(n for n in children if n.startswith("expert-")) == ["expert-0", "expert-1"]
    assert children["router"].env["MOEMESH_ROUTER_DEVICE"] == "cpu"


def test_plan_hands_the_kv_cache_dtype_to_the_router(tmp_path):
    from moemesh.serving.config import ConfigError
    from services.router.config import RouterConfig

    assert up.plan(_ns(), tmp_path)["router"].env["MOEMESH_KV_CACHE_DTYPE"] == "auto"
    env = up.plan(_ns(kv_cache_dtype="fp8"), tmp_path)["router"].env
    assert env["MOEMESH_KV_CACHE_DTYPE"] == "fp8"
    assert RouterConfig.from_args([], env).kv_cache_dtype == "fp8"
    with pytest.raises(ConfigError, match="MOEMESH_KV_CACHE_DTYPE: 'int8' is not one of"):
        RouterConfig.from_args([], {**env, "MOEMESH_KV_CACHE_DTYPE": "int8"})
