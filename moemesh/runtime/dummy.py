"""Random weights from config.json alone (`load_format="dummy"`, as vLLM's `--load-format dummy`).

    config.json -> ModelSpec -> {tensor name: shape} in the standard transformers layout -> DummyCheckpoint.read()
    makes each tensor on demand, on the target device and in the target dtype.

DummyCheckpoint answers the same questions as checkpoint.Checkpoint (`in`, read, read_rows, shape), so Backbone.load
and ExpertBank.load run unchanged: a 61 GB model is measured without a checkpoint on disk. Values: normal(0, 0.02)
for matrices (activations stay finite through 48 layers), ones for norm weights, zeros for biases. Each tensor is
drawn from a generator seeded by its name, so the backbone and every expert shard agree on the same model.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from moemesh.runtime.spec import ModelSpec

STD = 0.02
LOAD_FORMATS = ("auto", "dummy")


def _attention_shapes(spec: ModelSpec, p: str) -> dict[str, tuple[int, ...]]:
    a, h = spec.attention, spec.hidden_size
    if a.mla:
        rope, latent = a.qk_rope_head_dim, a.kv_lora_rank
        shapes = {f"{p}.kv_a_proj_with_mqa.weight": (latent + rope, h), f"{p}.kv_a_layernorm.weight": (latent,),
                  f"{p}.kv_b_proj.weight": (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), latent),
                  f"{p}.o_proj.weight": (h, a.num_heads * a.v_head_dim)}
        if a.q_lora_rank is None:
            shapes[f"{p}.q_proj.weight"] = (a.num_heads * a.head_dim, h)
        else:
            shapes.update({f"{p}.q_a_proj.weight": (a.q_lora_rank, h), f"{p}.q_a_layernorm.weight": (a.q_lora_rank,),
                           f"{p}.q_b_proj.weight": (a.num_heads * a.head_dim, a.q_lora_rank)})
        return shapes
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    shapes = {f"{p}.q_proj.weight": (q, h), f"{p}.k_proj.weight": (kv, h), f"{p}.v_proj.weight": (kv, h),
              f"{p}.o_proj.weight": (h, q)}
    if a.qk_norm:
        per_head = a.qk_norm == "head"
        shapes[f"{p}.q_norm.weight"] = (a.head_dim,) if per_head else (q,)
        shapes[f"{p}.k_norm.weight"] = (a.head_dim,) if per_head else (kv,)
    return shapes


def _mlp_shapes(p: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.gate_proj.weight": (inner, hidden), f"{p}.up_proj.weight": (inner, hidden),
            f"{p}.down_proj.weight": (hidden, inner)}


def _moe_shapes(spec: ModelSpec, p: str) -> dict[str, tuple[int, ...]]:
    """Experts in the fused layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]): ExpertBank reads one slice each."""
    m, h = spec.moe, spec.hidden_size
    shapes = {f"{p}.gate.weight": (m.num_experts, h),
              f"{p}.experts.gate_up_proj": (m.num_experts, 2 * m.intermediate_size, h),
              f"{p}.experts.down_proj": (m.num_experts, h, m.intermediate_size)}
    if m.correction_bias:
        shapes[f"{p}.gate.e_score_correction_bias"] = (m.num_experts,)
    if m.shared_intermediate_size:
        name = "shared_experts" if spec.attention.mla else "shared_expert"
        shapes.update(_mlp_shapes(f"{p}.{name}", h, m.shared_intermediate_size))
    if m.shared_gate:
        shapes[f"{p}.shared_expert_gate.weight"] = (1, h)
    return shapes


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name the loaders ask for, with its shape (standard transformers names)."""
    h = spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes.update(_attention_shapes(spec, f"{p}.self_attn"))
        if spec.is_moe_layer(i):
            shapes.update(_moe_shapes(spec, f"{p}.mlp"))
        else:
            shapes.update(_mlp_shapes(f"{p}.mlp", h, spec.intermediate_size))
    return shapes


class DummyCheckpoint:
    """Checkpoint look-alike whose tensors are random (see the module doc)."""

    def __init__(self, model_dir: str | Path, spec: ModelSpec) -> None:
        self.dir = Path(model_dir)
        self.files = tensor_shapes(spec)  # name -> shape (Checkpoint maps names to files)
        self.fp8_block = (128, 128)
        self.reads: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> list[int]:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not part of the dummy model of {str(self.dir)!r}")
        return list(self.files[name])

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        self.reads.append(name)
        return self._make(name, tuple(self.shape(name)), device, dtype)

    def read_rows(self, name: str, index: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """tensor[index] of a stacked tensor, drawn alone (seeded by name and index)."""
        self.reads.append(f"{name}[{index}]")
        return self._make(f"{name}[{index}]", tuple(self.shape(name)[1:]), device, dtype)

    @staticmethod
    def _make(key: str, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
        dtype = dtype or torch.float32
        if key.endswith("norm.weight"):
            return torch.ones(shape, device=device, dtype=dtype)
        if key.endswith("bias"):
            return torch.zeros(shape, device=device, dtype=dtype)
        generator = torch.Generator(device=device)
        generator.manual_seed(zlib.crc32(key.encode()))
        out = torch.empty(shape, device=device, dtype=dtype)
        return out.normal_(0.0, STD, generator=generator)

    def close(self) -> None:
        pass

    def __enter__(self) -> DummyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def open_checkpoint(model_dir: str | Path, spec: ModelSpec, load_format: str):
    """Checkpoint (real weights) or DummyCheckpoint, by load_format."""
    from moemesh.runtime.checkpoint import Checkpoint

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
    return DummyCheckpoint(model_dir, spec) if load_format == "dummy" else Checkpoint(model_dir)
