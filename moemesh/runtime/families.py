"""config.json of each supported architecture -> ModelSpec. Defaults for absent keys are the transformers ones.

Supported: LlamaForCausalLM (dense), MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM,
DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, and MoemeshLlamaMoeForCausalLM (the converter's Llama + routed experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from moemesh.runtime.spec import AttentionSpec, ConfigError, ModelSpec, MoeSpec, RopeSpec

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# transformers attribute_map aliases: the expert count is saved under one name or the other depending on version.
ALIASES = (("num_experts", "num_local_experts"), ("num_local_experts", "num_experts"),
           ("n_routed_experts", "num_local_experts"), ("n_routed_experts", "num_experts"))


class _Cfg:
    """config.json reader whose errors quote the key and the bad value."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = dict(data)
        for key, alias in ALIASES:
            if key not in self.data and alias in self.data:
                self.data[key] = self.data[alias]

    def int(self, key: str, default: Any = ..., minimum: int = 1) -> Any:
        value = self.data.get(key, default) if default is not ... else self._required(key)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"config.json: {key} must be an integer >= {minimum}, got {value!r}")
        return value

    def float(self, key: str, default: Any = ...) -> Any:
        value = self.data.get(key, default) if default is not ... else self._required(key)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config.json: {key} must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"config.json: {key} must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.data.get(key, default)
        if value not in allowed:
            raise ConfigError(f"config.json: {key} must be one of {list(allowed)}, got {value!r}")
        return value

    def _required(self, key: str) -> Any:
        if key not in self.data:
            raise ConfigError(f"config.json: missing required key {key!r}")
        return self.data[key]


def _rope(c: _Cfg, dim: int, interleaved: bool, default_theta: float = 10000.0) -> RopeSpec:
    params = dict(c.data.get("rope_parameters") or c.data.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json: rope type must be one of {list(ROPE_TYPES)}, got {rope_type!r}")
    partial = params.get("partial_rotary_factor", c.data.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor {partial!r} is not supported (only 1.0)")
    max_pos = c.int("max_position_embeddings", 2048)
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", c.data.get("original_max_position_embeddings", max_pos))
    params["rope_type"] = rope_type
    theta = params.get("rope_theta", c.data.get("rope_theta", default_theta))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    return RopeSpec(float(theta), dim, interleaved, max_pos, params)


def _eos(config: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    value = generation.get("eos_token_id", config.get("eos_token_id"))
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(values)


def _max_context(c: _Cfg, max_pos: int) -> int:
    """Sliding-window attention is not implemented: cap the context at the window so results stay exact."""
    window = c.data.get("sliding_window")
    uses_window = c.data.get("use_sliding_window", True)
    if window and uses_window:
        return min(max_pos, c.int("sliding_window"))
    return max_pos


def _base(c: _Cfg, arch: str, attention: AttentionSpec, rope: RopeSpec, config: dict, generation: dict,
          **kw: Any) -> ModelSpec:
    return ModelSpec(
        architecture=arch,
        model_type=str(config.get("model_type", "")),
        vocab_size=c.int("vocab_size"),
        hidden_size=c.int("hidden_size"),
        num_layers=c.int("num_hidden_layers"),
        intermediate_size=c.int("intermediate_size", 0, minimum=0),
        rms_norm_eps=c.float("rms_norm_eps", 1e-6),
        hidden_act=c.choice("hidden_act", "silu", ("silu", "gelu", "gelu_pytorch_tanh", "relu")),
        tie_word_embeddings=c.bool("tie_word_embeddings", False),
        max_context=_max_context(c, rope.max_position_embeddings),
        attention=attention,
        rope=rope,
        bos_token_id=c.int("bos_token_id", None, minimum=0),
        eos_token_ids=_eos(config, generation),
        **kw,
    )


def _gqa(c: _Cfg, qk_norm: str | None = None, clip: bool = False) -> AttentionSpec:
    heads = c.int("num_attention_heads")
    kv_heads = c.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    head_dim = c.int("head_dim", None) or c.int("hidden_size") // heads
    clip_qkv = c.float("clip_qkv", None) if clip else None
    return AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, qk_norm=qk_norm, clip_qkv=clip_qkv)


def _sparse_layers(c: _Cfg, num_experts: int) -> tuple[int, ...]:
    """Qwen MoE: layer i is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    only_dense = c.data.get("mlp_only_layers") or []
    step = c.int("decoder_sparse_step", 1)
    n = c.int("num_hidden_layers")
    return tuple(i for i in range(n) if i not in only_dense and num_experts > 0 and (i + 1) % step == 0)


def _llama(c: _Cfg, config: dict, generation: dict, default_theta: float = 10000.0, **kw) -> ModelSpec:
    att = _gqa(c)
    rope = _rope(c, att.head_dim, False, default_theta)
    return _base(c, config["architectures"][0], att, rope, config, generation, **kw)


def _mixtral(c: _Cfg, config: dict, generation: dict) -> ModelSpec:
    moe = MoeSpec(c.int("num_local_experts"), c.int("num_experts_per_tok"), c.int("intermediate_size"),
                  norm_topk_prob=True)
    layers = tuple(range(c.int("num_hidden_layers")))
    return _llama(c, config, generation, default_theta=1e6, moe=moe, moe_layers=layers)


def _qwen_moe(c: _Cfg, config: dict, generation: dict, v3: bool) -> ModelSpec:
    experts = c.int("num_experts", minimum=0)
    shared = 0 if v3 else c.int("shared_expert_intermediate_size", minimum=0)
    moe = MoeSpec(experts, c.int("num_experts_per_tok"), c.int("moe_intermediate_size"),
                  norm_topk_prob=c.bool("norm_topk_prob", False), shared_intermediate_size=shared, shared_gate=not v3)
    att = _gqa(c, qk_norm="head" if v3 else None)
    layers = _sparse_layers(c, experts)
    return _base(c, config["architectures"][0], att, _rope(c, att.head_dim, False), config, generation,
                 moe=moe if layers else None, moe_layers=layers)


def _olmoe(c: _Cfg, config: dict, generation: dict) -> ModelSpec:
    experts = c.int("num_experts")
    moe = MoeSpec(experts, c.int("num_experts_per_tok"), c.int("intermediate_size"),
                  norm_topk_prob=c.bool("norm_topk_prob", False))
    att = _gqa(c, qk_norm="full", clip=True)
    layers = tuple(range(c.int("num_hidden_layers")))
    rope = _rope(c, att.head_dim, False)
    return _base(c, "OlmoeForCausalLM", att, rope, config, generation, moe=moe, moe_layers=layers)


def _moemesh(c: _Cfg, config: dict, generation: dict) -> ModelSpec:
    weighting = c.choice("router_weighting", "unit", ("unit", "softmax"))
    moe = MoeSpec(
        c.int("num_local_experts"), c.int("num_experts_per_tok"), c.int("moe_intermediate_size"),
        scoring="unit" if weighting == "unit" else "softmax", norm_topk_prob=weighting == "softmax",
        shared_intermediate_size=c.int("shared_expert_intermediate_size", 0, minimum=0),
    )
    return _llama(c, config, generation, moe=moe, moe_layers=tuple(range(c.int("num_hidden_layers"))))


def _mla(c: _Cfg, rope: RopeSpec) -> AttentionSpec:
    nope, rope_dim, v_dim = c.int("qk_nope_head_dim"), c.int("qk_rope_head_dim"), c.int("v_head_dim")
    scale = (nope + rope_dim) ** -0.5
    mscale_all_dim = rope.scaling.get("mscale_all_dim") or 0
    if rope.scaling["rope_type"] != "default" and mscale_all_dim:  # DeepSeek yarn: softmax scale * mscale^2
        factor = rope.scaling["factor"]
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale = scale * mscale * mscale
    heads = c.int("num_attention_heads")
    return AttentionSpec(
        heads, heads, nope + rope_dim, scale, mla=True, q_lora_rank=c.int("q_lora_rank", None),
        kv_lora_rank=c.int("kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
    )


def _deepseek(c: _Cfg, config: dict, generation: dict, v3: bool) -> ModelSpec:
    interleaved = c.bool("rope_interleave", True) if v3 else True
    rope = _rope(c, c.int("qk_rope_head_dim"), interleaved)
    experts = c.int("n_routed_experts")
    method = c.choice("topk_method", "noaux_tc" if v3 else "greedy", ("greedy", "group_limited_greedy", "noaux_tc"))
    scoring = c.choice("scoring_func", "sigmoid" if v3 else "softmax", ("softmax", "sigmoid"))
    grouped = method != "greedy"
    n_group = c.int("n_group", 8 if v3 else 1) if grouped else 1
    topk_group = c.int("topk_group", 4 if v3 else 1) if grouped else 1
    if experts % n_group or topk_group > n_group:
        raise ConfigError(f"config.json: n_group {n_group} / topk_group {topk_group} do not fit {experts} experts")
    moe = MoeSpec(
        experts, c.int("num_experts_per_tok"), c.int("moe_intermediate_size"), scoring=scoring,
        norm_topk_prob=c.bool("norm_topk_prob", v3),
        routed_scaling_factor=c.float("routed_scaling_factor", 2.5 if v3 else 1.0),
        n_group=n_group, topk_group=topk_group, group_score="top2" if method == "noaux_tc" else "max",
        correction_bias=method == "noaux_tc",
        shared_intermediate_size=c.int("n_shared_experts", 0, minimum=0) * c.int("moe_intermediate_size"),
    )
    first_dense, freq = c.int("first_k_dense_replace", 3 if v3 else 0, minimum=0), c.int("moe_layer_freq", 1)
    layers = tuple(i for i in range(c.int("num_hidden_layers")) if i >= first_dense and i % freq == 0)
    return _base(c, config["architectures"][0], _mla(c, rope), rope, config, generation, moe=moe, moe_layers=layers)


FAMILIES: dict[str, Callable[[_Cfg, dict, dict], ModelSpec]] = {
    "LlamaForCausalLM": _llama,
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": lambda c, cfg, gen: _qwen_moe(c, cfg, gen, v3=False),
    "Qwen3MoeForCausalLM": lambda c, cfg, gen: _qwen_moe(c, cfg, gen, v3=True),
    "OlmoeForCausalLM": _olmoe,
    "DeepseekV2ForCausalLM": lambda c, cfg, gen: _deepseek(c, cfg, gen, v3=False),
    "DeepseekV3ForCausalLM": lambda c, cfg, gen: _deepseek(c, cfg, gen, v3=True),
    "MoemeshLlamaMoeForCausalLM": _moemesh,
}


def spec_from_config(config: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelSpec:
    """ModelSpec from parsed config.json (and generation_config.json, whose eos_token_id wins)."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ConfigError(f"config.json: architectures must be a non-empty list, got {archs!r}")
    family = FAMILIES.get(archs[0])
    if family is None:
        raise ConfigError(f"config.json: architecture {archs[0]!r} is not supported; supported: {sorted(FAMILIES)}")
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "fp8", "compressed-tensors", "awq", "gptq"):  # the int layouts: moemesh/quant/formats.py
        raise ConfigError(f"config.json: quantization_config.quant_method {quant!r} is not supported (fp8, "
                          "compressed-tensors, awq, gptq)")
    spec = family(_Cfg(config), config, generation or {})
    if spec.moe and spec.moe.top_k > spec.moe.num_experts:
        raise ConfigError(f"config.json: num_experts_per_tok {spec.moe.top_k} exceeds {spec.moe.num_experts} experts")
    return spec
