"""Settings of one expert shard process (flags, then MOEMESH_EXPERT_* env, then defaults).

Which experts: either `--shard-index I --num-shards N` (the runtime's shard_experts(num_experts, N, I) split, the
same on every shard so the shards tile the experts), or an explicit `--experts 0-3,8` list. In Kubernetes the shard
index comes from the StatefulSet pod ordinal (deploy/k8s/expert.yaml).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from moemesh.serving.config import ConfigError, ServiceConfig, setting

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "fp8", "int8", "int4")  # = moemesh.runtime.quant.QUANTIZATIONS (configs import no torch)
BACKENDS = ("torch", "onnxruntime", "packed")  # = moemesh.runtime.ort.BACKENDS


def parse_expert_list(items: tuple[str, ...], source: str) -> tuple[int, ...]:
    """("0-3", "8") -> (0, 1, 2, 3, 8); ConfigError quoting the bad item."""
    out: list[int] = []
    for item in items:
        lo, sep, hi = item.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(item), int(item))
        except ValueError:
            raise ConfigError(f"{source}: {item!r} is not an expert id or a range like 0-7") from None
        if first < 0 or last < first:
            raise ConfigError(f"{source}: {item!r} is not a non-empty range of non-negative expert ids")
        out.extend(range(first, last + 1))
    if len(set(out)) != len(out):
        raise ConfigError(f"{source}: {','.join(items)!r} lists an expert twice")
    return tuple(sorted(out))


@dataclass(frozen=True)
class ExpertConfig(ServiceConfig):
    """An expert shard: the routed experts of the MoE layers, for the router's per-layer Forward calls."""

    SERVICE: ClassVar[str] = "expert"

    port: int = setting(50055, "gRPC port (0: any free port)")
    model: str = setting("smollm2-moe", "model name (models registry) or checkpoint directory",
                         env="MOEMESH_MODEL")
    shard_index: int = setting(0, "this shard's index in 0..num_shards-1")
    num_shards: int = setting(1, "number of shards the experts are split over")
    experts: tuple[str, ...] = setting((), "explicit expert ids/ranges to host, e.g. 0-3,8 (overrides the split)")
    placement: str = setting("", "per-layer placement file (`moemesh placement --per-layer`): host entry "
                             "shard_index of each layer (overrides experts)")
    device: str = setting("cpu", "torch device of the experts (cpu, cuda, cuda:1)")
    dtype: str = setting("float32", "compute dtype of the experts", choices=DTYPES)
    backend: str = setting("torch", "expert backend: torch, onnxruntime (int4/int8 MatMulNBits: the checkpoint's weights, else int8 round-to-nearest; float32 only) or packed (torch's int8/int4 CPU kernels: the checkpoint's int4 codes, else int8)", env="MOEMESH_BACKEND", choices=BACKENDS)
    compute_threads: int = setting(0, "torch intra-op threads (0: torch's default)")
    load_format: str = setting("auto", "weights: auto (the checkpoint's) or dummy (random from config.json, seeded per "
                               "tensor name, as the router's)", choices=("auto", "dummy"))
    quantization: str = setting("none", "weight-only quantization of this shard's experts: none, fp8 (e4m3) "
                                "or int8, per-channel scales, or int4 (a scale per 128 columns)",
                                env="MOEMESH_QUANTIZATION", choices=QUANTIZATIONS)
    spin_us: int = setting(-1, "microseconds a shared-memory link polls for the router's next request after each "
                           "reply before it blocks (0: never; -1: auto, SPIN_AUTO_US on a CPU shard whose index is "
                           "below the core count - 1, so that a core stays free for the router, else 0)")

    # Covers the router's work between two layers at batch 1 (~0.6 ms on 2 cores). On 2 nearly quiet cores (load 1-6)
    # auto beat the blocking hand-off in 6 of 6 paired runs at batch 1 (load 2.3: 43.3 vs 45.7 ms per token, batch 8
    # 77.5 vs 82.7; polling on both shards was slower than either); on loaded cores (load 15-28) the results went
    # both ways (benchmarks/results/mesh-decode-cpu-spin-*.md).
    SPIN_AUTO_US: ClassVar[int] = 2000

    def validate(self) -> None:
        super().validate()
        if self.num_shards < 1:
            raise ConfigError(f"{self.source('num_shards')}: {self.num_shards!r} must be >= 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"{self.source('shard_index')}: {self.shard_index!r} is not in 0..{self.num_shards - 1} "
                f"(num_shards {self.num_shards})"
            )
        if not self.model:
            raise ConfigError(f"{self.source('model')}: empty model name")
        if not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise ConfigError(f"{self.source('device')}: {self.device!r} is not cpu, cuda[:N] or mps")
        if self.compute_threads < 0:
            raise ConfigError(f"{self.source('compute_threads')}: {self.compute_threads!r} must be >= 0")
        if self.spin_us < -1:
            raise ConfigError(f"{self.source('spin_us')}: {self.spin_us!r} must be >= 0, or -1 (auto)")
        self.expert_list()
        if self.backend == "packed" and (self.device.split(":")[0] != "cpu" or self.quantization == "fp8"):
            raise ConfigError(f"{self.source('backend')}: packed runs torch's int8/int4 CPU kernels: it needs device "
                              f"cpu and quantization none, int8 or int4 (got {self.device!r}, {self.quantization!r})")
        if self.backend == "onnxruntime" and (self.dtype != "float32" or self.quantization != "none"):
            raise ConfigError(f"{self.source('backend')}: onnxruntime needs dtype float32 and quantization none "
                              f"(got {self.dtype!r}, {self.quantization!r})")

    def expert_list(self) -> tuple[int, ...] | None:
        """Explicit expert ids, or None to use the shard_index/num_shards split."""
        return parse_expert_list(self.experts, self.source("experts")) if self.experts else None

    def spin_seconds(self, cores: int | None = None) -> float:
        """The shared-memory poll window in seconds (spin_us resolved; cores: the CPUs this process may run on unless
        given). Only shared-memory links poll, i.e. a router on the same host (`moemesh up`)."""
        if self.spin_us >= 0:
            return self.spin_us / 1e6
        cores = cores or len(os.sched_getaffinity(0)) or 1
        return self.SPIN_AUTO_US / 1e6 if self.device == "cpu" and self.shard_index < cores - 1 else 0.0
