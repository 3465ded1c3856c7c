"""A tiny random-weight checkpoint with the built-in model's real tokenizer, for fast mesh and service tests.

Layouts:
- "MoemeshLlamaMoeForCausalLM" (agreed with the runtime, see moemesh.runtime.families): the Llama backbone, and per
  layer `model.layers.{i}.mlp.gate.weight` [E, H], `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`
  ([I, H], [I, H], [H, I] with I = moe_intermediate_size) and, when shared_expert_intermediate_size > 0,
  `model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight`.
- "LlamaForCausalLM": the plain dense Llama (mlp.{gate,up,down}_proj).
The vocabulary is SmolLM2's (49152), so the embedding dominates: 49152 x 64 float32 = 12.6 MB, tied with the head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

MOE_ARCH = "MoemeshLlamaMoeForCausalLM"
DENSE_ARCH = "LlamaForCausalLM"
VOCAB_SIZE = 49152
BOS_ID, EOS_IDS, PAD_ID = 1, [2, 0], 2  # SmolLM2: <|im_start|>, <|im_end|> / <|endoftext|>


def tiny_config(arch: str, *, num_experts: int, top_k: int, hidden: int, layers: int, heads: int, kv_heads: int,
                intermediate: int, moe_intermediate: int, shared_expert_intermediate: int,
                router_weighting: str) -> dict[str, Any]:
    if arch not in (MOE_ARCH, DENSE_ARCH):
        raise ValueError(f"arch must be {MOE_ARCH!r} or {DENSE_ARCH!r}, got {arch!r}")
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(f"hidden {hidden} / heads {heads} / kv_heads {kv_heads} do not give an even head_dim")
    config: dict[str, Any] = {
        "architectures": [arch], "model_type": "llama" if arch == DENSE_ARCH else "moemesh_llama_moe",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": VOCAB_SIZE, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_IDS[0], "pad_token_id": PAD_ID, "torch_dtype": "float32",
    }
    if arch == MOE_ARCH:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if router_weighting not in ("unit", "softmax"):
            raise ValueError(f"router_weighting must be 'unit' or 'softmax', got {router_weighting!r}")
        config.update(num_local_experts=num_experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=moe_intermediate,
                      shared_expert_intermediate_size=shared_expert_intermediate, router_weighting=router_weighting)
    return config


def tiny_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Gaussian weights (std 0.02, larger for the router so routing is not a tie), unit RMSNorm weights."""
    rng = np.random.default_rng(seed)
    h, n_layers = config["hidden_size"], config["num_hidden_layers"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(config["vocab_size"], h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            w[p + f"self_attn.{name}.weight"] = normal(out, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        if config["architectures"][0] == DENSE_ARCH:
            w.update(_ffn(normal, p + "mlp.", h, config["intermediate_size"]))
            continue
        w[p + "mlp.gate.weight"] = normal(config["num_local_experts"], h, std=0.5)  # [E, H]
        for e in range(config["num_local_experts"]):
            w.update(_ffn(normal, p + f"mlp.experts.{e}.", h, config["moe_intermediate_size"]))
        if config["shared_expert_intermediate_size"]:
            w.update(_ffn(normal, p + "mlp.shared_expert.", h, config["shared_expert_intermediate_size"]))
    return w


def _ffn(normal: Any, prefix: str, hidden: int, inter: int) -> dict[str, np.ndarray]:
    return {prefix + "gate_proj.weight": normal(inter, hidden), prefix + "up_proj.weight": normal(inter, hidden),
            prefix + "down_proj.weight": normal(hidden, inter)}


def make_tiny_model(out_dir: str | Path, *, arch: str = MOE_ARCH, num_experts: int = 4, top_k: int = 2,
                    hidden: int = 64, layers: int = 2, seed: int = 0, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, moe_intermediate: int = 32, shared_expert_intermediate: int = 0,
                    router_weighting: str = "softmax", tokenizer_from: str | Path | None = None) -> Path:
    """Write the tiny checkpoint into out_dir; tokenizer files are copied from `tokenizer_from` (a checkpoint
    directory) or built from the built-in GGUF. Deterministic for a given seed."""
    config = tiny_config(arch, num_experts=num_experts, top_k=top_k, hidden=hidden, layers=layers, heads=heads,
                         kv_heads=kv_heads, intermediate=intermediate, moe_intermediate=moe_intermediate,
                         shared_expert_intermediate=shared_expert_intermediate, router_weighting=router_weighting)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tiny_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it 0600
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_IDS, "pad_token_id": PAD_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer(out, tokenizer_from)
    return out


def _write_tokenizer(out: Path, tokenizer_from: str | Path | None) -> None:
    from moemesh.builtin.gguf_tokenizer import TOKENIZER_FILES  # here: the gguf package only where a tokenizer is made

    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_from) / name, out / name)
        return
    from moemesh.builtin.gguf_reader import GgufLlama
    from moemesh.builtin.gguf_source import builtin_gguf_path
    from moemesh.builtin.gguf_tokenizer import write_tokenizer_files

    write_tokenizer_files(GgufLlama.open(builtin_gguf_path()), out)
