"""A differentiable Llama whose FFNs are dense or partitioned MoE layers: the teacher and the student of conversion.

The serving runtime (`moemesh.runtime`) is inference-only; conversion needs gradients, per-layer activations and
hidden states, so it uses this small model. Its MoE FFN keeps the experts' weights stacked in neuron order
(`gate`/`up` [E*I, H], `down` [H, E*I]) and scales each expert's neurons by that token's routing weight, so running
every expert costs one dense FFN and the forward with weights 0/1 is exactly the sparse MoE (unit weighting).
tests/convert checks it against the runtime and transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# recorder(layer, ffn_input [N, H], neuron_activations [N, F]) sees each FFN's input and silu(gate) * up.
Recorder = Callable[[int, torch.Tensor, torch.Tensor], None]
KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [B, kv_heads, S, D]
KVCache = list[KV]
LayerRecord = Callable[[torch.Tensor, torch.Tensor], None]  # (ffn input, activations) of one layer


@dataclass(frozen=True)
class LlamaShape:
    """The dense Llama hyper-parameters conversion needs (from config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> LlamaShape:
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r}: conversion supports only the default rotary embedding")
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = int(config["num_attention_heads"])
        return cls(
            vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            rms_norm_eps=float(config["rms_norm_eps"]), rope_theta=float(theta),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # as HF: normalise in float32, scale in the input dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for rotate-half rope at integer `positions` [T] (float32, like HF)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        h, d = shape.hidden_size, shape.head_dim
        self.heads, self.kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, d
        self.q_proj = nn.Linear(h, shape.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, shape.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, shape.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(shape.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: KV | None) -> tuple[torch.Tensor, KV]:
        b, t, _ = x.shape  # x [B, T, H]; q [B, heads, T, D]; k, v [B, kv_heads, S, D]
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # Without a cache the block is causal; one decode token (t == 1) attends to everything cached.
        causal = past is None and t > 1
        if past is not None and t > 1:
            raise ValueError("a cached forward takes one token per sequence")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class DenseFFN(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor, record: LayerRecord | None = None) -> torch.Tensor:
        act = self.activations(x)
        if record is not None:
            record(x, act)
        return self.down_proj(act)


class MoEFFN(nn.Module):
    """Routed experts stacked in neuron order plus an optional always-on shared expert (unweighted)."""

    def __init__(self, hidden: int, experts: int, expert_inter: int, top_k: int, shared_inter: int,
                 weighting: str) -> None:
        super().__init__()
        self.experts, self.expert_inter, self.top_k, self.weighting = experts, expert_inter, top_k, weighting
        self.router = nn.Linear(hidden, experts, bias=False)
        self.routed = DenseFFN(hidden, experts * expert_inter)
        self.shared = DenseFFN(hidden, shared_inter) if shared_inter else None
        self.straight_through = False  # training: unit forward values, router gradients through softmax

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights [N, E]: the top-k experts get 1.0 (unit) or their softmax share, others 0."""
        logits = self.router(x).float()  # [N, E]
        top_val, top_idx = torch.topk(logits, self.top_k, dim=-1)
        if self.weighting == "softmax":
            chosen = torch.softmax(top_val, dim=-1)
        else:
            chosen = torch.ones_like(top_val)
        weights = torch.zeros_like(logits).scatter(-1, top_idx, chosen)
        if self.straight_through:
            probs = torch.softmax(logits, dim=-1)
            weights = weights + probs - probs.detach()  # same values, d(loss)/d(router) through every expert
        return weights

    def forward(self, x: torch.Tensor, record: LayerRecord | None = None) -> torch.Tensor:
        weights = self.route(x).to(x.dtype)  # [N, E]
        act = self.routed.activations(x)  # [N, E*I]
        if record is not None:
            record(x, act)
        act = (act.unflatten(-1, (self.experts, self.expert_inter)) * weights.unsqueeze(-1)).flatten(-2)
        out = self.routed.down_proj(act)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


class Block(nn.Module):
    def __init__(self, shape: LlamaShape, ffn: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = ffn


class TrainableLlama(nn.Module):
    """Llama decoder; `ffns` gives each layer's FFN (DenseFFN or MoEFFN)."""

    def __init__(self, shape: LlamaShape, ffns: list[nn.Module]) -> None:
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(Block(shape, ffn) for ffn in ffns)
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = None if shape.tie_word_embeddings else nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, ids: torch.Tensor, *, hiddens: list[torch.Tensor] | None = None,
                recorder: Recorder | None = None, cache: KVCache | None = None, start: int = 0,
                head: bool = True) -> torch.Tensor:
        """Logits [B, T, V] of token ids [B, T] at positions start..start+T-1 (head=False: final hidden [B, T, H]).

        hiddens: if a list, each layer's output residual [B, T, H] is appended. cache: if a list, it is filled
        (start == 0) or extended (start > 0, one token per sequence) with each layer's keys and values.
        """
        x = self.embed_tokens(ids)
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        cos, sin = rope_cos_sin(positions, self.shape.head_dim, self.shape.rope_theta)
        for i, layer in enumerate(self.layers):
            past = cache[i] if cache is not None and start > 0 else None
            attn, kv = layer.self_attn(layer.input_layernorm(x), cos, sin, past)
            if cache is not None and start > 0:
                cache[i] = kv
            elif cache is not None:
                cache.append(kv)
            x = x + attn
            h = layer.post_attention_layernorm(x)
            record = None if recorder is None else (
                lambda inp, act, i=i: recorder(i, inp.flatten(0, -2), act.flatten(0, -2)))
            x = x + layer.mlp(h, record)
            if hiddens is not None:
                hiddens.append(x)
        return F.linear(self.norm(x), self.head_weight()) if head else self.norm(x)

    def moe_layers(self) -> list[MoEFFN]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEFFN)]
