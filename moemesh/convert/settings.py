"""What a dense -> MoE conversion does (`ConvertSettings`), validated once, hashed for the cache.

Shapes: a dense FFN of F neurons becomes `shared_neurons` always-on neurons (the shared expert, 0 = none) plus
`experts` routed experts of (F - shared_neurons) / experts neurons each; a token runs the shared expert and its
`top_k` best routed experts. With unit weighting and top_k == experts the MoE is exactly the dense function.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

CLUSTER_METHODS = ("coactivation", "kmeans", "contiguous")
ROUTER_WEIGHTINGS = ("unit", "softmax")
# Bump when the conversion algorithm changes what it writes: a cached output of an older version is rebuilt.
ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class ConvertSettings:
    """Every knob of `moemesh convert`; the defaults are the built-in `smollm2-moe` (all 8 experts on)."""

    experts: int = 8
    top_k: int = 8
    shared_neurons: int = 0
    cluster: str = "coactivation"
    router_weighting: str = "unit"
    calib_tokens: int = 4096
    seq_len: int = 128  # length of each self-generated sequence (first token included)
    router_steps: int = 300  # full-batch Adam steps of the router calibration, per layer
    distill_steps: int = 0
    train_experts: bool = False
    distill_batch: int = 8  # sequences per distillation step
    distill_tokens: int = 65536  # self-generated tokens the distillation samples its batches from
    lr_router: float = 1e-3
    lr_experts: float = 5e-5
    hidden_weight: float = 0.3  # weight of the normalised hidden-state MSE beside the logit KL
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "experts", "top_k", "calib_tokens", "seq_len", "router_steps", "distill_batch")
        _non_negative(self, "shared_neurons", "distill_steps", "distill_tokens", "seed")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        if self.cluster not in CLUSTER_METHODS:
            raise ValueError(f"cluster={self.cluster!r}; choose one of {', '.join(CLUSTER_METHODS)}")
        if self.router_weighting not in ROUTER_WEIGHTINGS:
            raise ValueError(f"router_weighting={self.router_weighting!r}; "
                             f"choose one of {', '.join(ROUTER_WEIGHTINGS)}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len={self.seq_len} is too short (at least 8 tokens)")
        if self.distill_steps and self.distill_tokens < self.seq_len:
            raise ValueError(f"distill_tokens={self.distill_tokens} is less than one sequence (seq_len={self.seq_len})")
        for name in ("lr_router", "lr_experts", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def check_ffn(self, intermediate_size: int) -> int:
        """Neurons per routed expert for a dense FFN of `intermediate_size`; ValueError naming the bad setting."""
        if self.shared_neurons >= intermediate_size:
            raise ValueError(f"shared_neurons={self.shared_neurons} leaves no routed neuron of {intermediate_size}")
        routed = intermediate_size - self.shared_neurons
        if routed % self.experts:
            raise ValueError(
                f"experts={self.experts} does not divide the {routed} routed neurons "
                f"({intermediate_size} - shared_neurons={self.shared_neurons})"
            )
        return routed // self.experts

    def active_ffn_fraction(self, intermediate_size: int) -> float:
        """FFN parameters a token uses over the dense FFN's (router weights not counted)."""
        per_expert = self.check_ffn(intermediate_size)
        return (self.shared_neurons + self.top_k * per_expert) / intermediate_size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConvertSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown conversion settings: {', '.join(unknown)}")
        return cls(**data)

    def digest(self) -> str:
        """Short stable hash of the settings and the algorithm version (names cache entries)."""
        payload = json.dumps({"v": ALGORITHM_VERSION, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _positive(obj: ConvertSettings, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}={getattr(obj, name)} must be > 0")


def _non_negative(obj: ConvertSettings, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name}={getattr(obj, name)} must be >= 0")
