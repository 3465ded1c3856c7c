"""benchmarks/multi_gpu.py's arithmetic (no mesh started here: the script itself ran, results/multi-gpu-cpu.md):
the DP2 load split, the two runs combined into one figure, per-call times from two Prometheus scrapes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from multi_gpu import combine, split  # noqa: E402
from multi_gpu_parts import layer_times  # noqa: E402


def test_split_gives_both_meshes_a_share_and_drops_empty_ones():
    assert split(1, 2) == [1]
    assert split(5, 2) == [3, 2]
    assert split(64, 2) == [32, 32]
    assert split(8, 1) == [8]


def test_combine_sums_throughput_and_keeps_the_worse_p99():
    a = {"output_tokens_per_s": 10.0, "completed": 3, "failed": 0, "ttft_ms": {"p50": 100, "p99": 300},
         "itl_ms": {"p50": 10, "p99": 40}}
    b = {"output_tokens_per_s": 5.0, "completed": 1, "failed": 1, "ttft_ms": {"p50": 200, "p99": 900},
         "itl_ms": {"p50": 30, "p99": 20}}
    out = combine([a, b])
    assert out["output_tokens_per_s"] == 15.0 and out["completed"] == 4 and out["failed"] == 1
    assert out["ttft_ms"] == {"p50": 125.0, "p99": 900} and out["itl_ms"] == {"p50": 15.0, "p99": 40}


def _scrape(calls: int, call_s: float, computes: int, compute_s: float, merged: int = 0) -> dict[str, str]:
    return {
        "router": f'moemesh_router_expert_call_seconds_count{{shard="a"}} {calls}\n'
                  f'moemesh_router_expert_call_seconds_sum{{shard="a"}} {call_s}\n',
        "router-1": "",
        "expert-0": f"moemesh_expert_forward_compute_seconds_count {computes}\n"
                    f"moemesh_expert_forward_compute_seconds_sum {compute_s}\n"
                    f"moemesh_expert_merged_blocks_total {merged}\n",
    }


def test_layer_times_are_per_call_differences_between_scrapes():
    out = layer_times([_scrape(10, 1.0, 10, 0.5)], [_scrape(110, 1.3, 110, 0.6, merged=20)])
    assert out["expert_calls"] == 100
    assert out["call_us"] == pytest.approx(3000.0) and out["compute_us"] == pytest.approx(1000.0)
    assert out["dispatch_combine_us"] == pytest.approx(2000.0) and out["merged_share"] == pytest.approx(0.2)
    assert layer_times([_scrape(10, 1.0, 10, 0.5)], [_scrape(10, 1.0, 10, 0.5)]) == {}  # no expert calls
