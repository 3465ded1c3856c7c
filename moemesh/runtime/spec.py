"""One normalized description of a decoder checkpoint (`ModelSpec`), whatever HF family wrote its config.json.

The runtime is written once against ModelSpec; `moemesh.runtime.families` turns each architecture's config.json
into it. Tensor names are not part of the spec: the loaders find them in the checkpoint (several layouts exist).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json describes something the runtime cannot run; the message quotes the bad key and value."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding. `scaling` holds rope_type and its parameters (HF `rope_parameters` keys)."""

    theta: float
    dim: int  # rotated features per head
    interleaved: bool  # DeepSeek: pairs (x0, x1), (x2, x3)...; others: rotate-half (x_i, x_{i + dim/2})
    max_position_embeddings: int
    scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})


@dataclass(frozen=True)
class AttentionSpec:
    """Self-attention of every layer: grouped-query attention, or DeepSeek's multi-head latent attention (mla)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k/v head size (GQA); for MLA the q/k head size is qk_nope + qk_rope, values v_head_dim
    scale: float  # softmax scale
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3); "full": over the whole projection (OLMoE)
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-clip, clip]
    mla: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


@dataclass(frozen=True)
class MoeSpec:
    """Routing and expert shapes of the MoE layers.

    scoring: "softmax" (probabilities over all experts, then top-k), "sigmoid" (DeepSeek V3: per-expert sigmoid,
    choice biased by e_score_correction_bias), "unit" (moemesh: top-k logits, each selected weight exactly 1.0).
    """

    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert
    scoring: str = "softmax"
    norm_topk_prob: bool = False  # renormalise the selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing (DeepSeek): experts in n_group groups, only topk_group groups eligible
    topk_group: int = 1
    group_score: str = "max"  # "max" (V2) or "top2" (V3: sum of the two best biased scores of the group)
    correction_bias: bool = False  # DeepSeek V3 e_score_correction_bias
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: shared expert output times sigmoid(shared_expert_gate(x))


@dataclass(frozen=True)
class ModelSpec:
    """Everything the runtime needs to build and size the model."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int  # dense FFN layers
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    max_context: int  # longest sequence the model supports (positions, sliding window)
    attention: AttentionSpec
    rope: RopeSpec
    moe: MoeSpec | None = None
    moe_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts if self.moe else 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_spec(model_dir: str | Path) -> ModelSpec:
    """ModelSpec of a checkpoint directory (config.json, plus eos ids from generation_config.json when present)."""
    from moemesh.runtime.families import spec_from_config  # families imports this module

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {str(model_dir)!r}")
    config = read_json(config_path)
    generation_path = model_dir / "generation_config.json"
    generation = read_json(generation_path) if generation_path.is_file() else {}
    return spec_from_config(config, generation)
