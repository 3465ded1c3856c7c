"""A llama-architecture GGUF file read as HF Llama tensors: dequantized to float32, renamed, Q/K un-permuted.

llama.cpp's converter permutes the rows of attn_q / attn_k so that its interleaved (GPT-J style) rope applies to
adjacent pairs; HF's LlamaForCausalLM rotates halves (rotate_half). A GGUF read without un-permuting still loads but
generates garbage (FACTS.md: logits off by 33.5), so `unpermute_rope` is applied to every Q and K matrix here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

_MISSING = object()

# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows [n_head * head_dim, in] from interleaved pairs to rotate-half halves.

    llama.cpp wrote w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2); this undoes exactly that.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {weight.shape} for {n_head} heads: rows not divisible by 2*heads")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` (rotate-half -> interleaved); the inverse of `unpermute_rope`, used by tests."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(gguf_name: str) -> str:
    """HF Llama name of a GGUF tensor; ValueError for a tensor this reader does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r} (expected a llama-architecture tensor)")


def _float32_repr(value: Any) -> Any:
    """GGUF floats are float32; 9.999999747e-06 becomes 1e-05 (the shortest repr of that float32)."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value


@dataclass
class GgufLlama:
    """An open llama-architecture GGUF file: metadata by key, tensors in HF layout."""

    path: Path
    reader: GGUFReader

    @classmethod
    def open(cls, path: str | Path) -> GgufLlama:
        path = Path(path)
        reader = GGUFReader(path)
        self = cls(path=path, reader=reader)
        arch = self.metadata("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
        return self

    def metadata(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise KeyError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return _float32_repr(field.contents())

    def arch(self, key: str, default: Any = _MISSING) -> Any:
        """Architecture metadata, e.g. arch("block_count") reads "llama.block_count"."""
        return self.metadata(f"llama.{key}", default)

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array in HF [out, in] layout) for every tensor, Q/K un-permuted."""
        n_head = int(self.arch("attention.head_count"))
        n_kv = int(self.arch("attention.head_count_kv", n_head))
        for tensor in self.reader.tensors:
            # GGUF lists dims fastest-first; numpy data is already row-major [out, in] after dequantizing.
            weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            weight = weight.reshape([int(d) for d in reversed(tensor.shape)])
            if tensor.name.endswith("attn_q.weight"):
                weight = unpermute_rope(weight, n_head)
            elif tensor.name.endswith("attn_k.weight"):
                weight = unpermute_rope(weight, n_kv)
            yield hf_tensor_name(tensor.name), np.ascontiguousarray(weight)
