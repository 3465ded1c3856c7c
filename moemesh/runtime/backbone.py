"""The model minus its routed experts: embeddings, attention, norms, expert gates, shared experts, LM head.

Per MoE layer the backbone routes (gate.Gate), hands the routed part to an ExpertDispatch (in process or over gRPC)
and adds the shared expert itself. Loading reads only non-expert tensors.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.runtime.attention import Attention
from moemesh.runtime.checkpoint import Checkpoint
from moemesh.runtime.expert_load import ExpertLoad
from moemesh.runtime.experts import moe_prefix
from moemesh.runtime.layers import GatedMLP, Linear, Loader, RMSNorm
from moemesh.runtime.mla import LatentAttention
from moemesh.runtime.rope import Rotary
from moemesh.runtime.gate import Gate
from moemesh.runtime.spec import ModelSpec
from moemesh.runtime.step_context import StepContext
from moemesh.runtime.types import ExpertDispatch

T = TypeVar("T")


class MoeBlock(nn.Module):
    """Gate + shared expert of one MoE layer; the routed experts are behind the dispatch."""

    expert_load: ExpertLoad | None = None  # routed-token counters, set by ExpertLoad.attach (the router does)

    def __init__(self, layer: int, gate: Gate, shared: GatedMLP | None, shared_gate: Linear | None) -> None:
        super().__init__()
        self.layer, self.gate, self.shared, self.shared_gate = layer, gate, shared, shared_gate

    @classmethod
    def load(cls, ld: Loader, layer: int, spec: ModelSpec) -> MoeBlock:
        moe = spec.moe
        prefix = moe_prefix(ld.ckpt, layer)
        shared = shared_gate = None
        if moe.shared_intermediate_size:
            name = "shared_experts" if ld.has(f"{prefix}.shared_experts.gate_proj.weight") else "shared_expert"
            shared = GatedMLP.load(ld, f"{prefix}.{name}", spec.hidden_act)
        if moe.shared_gate:
            shared_gate = Linear.load(ld, f"{prefix}.shared_expert_gate")
        return cls(layer, Gate.load(ld, f"{prefix}.gate", moe), shared, shared_gate)

    def forward(self, h: torch.Tensor, dispatch: ExpertDispatch) -> torch.Tensor:  # [T, H] -> [T, H]
        return drive(self.steps(h, dispatch))

    def steps(self, h: torch.Tensor, dispatch: ExpertDispatch,
              logits: torch.Tensor | None = None) -> Generator[None, None, torch.Tensor]:
        """forward() as a generator that yields once, while the routed experts are out (after submit and the
        shared expert, before collect): a caller may run another micro-batch's work there (micro_batch.py).
        logits [T, E] float32: the gate's logits of h, already computed (Backbone._fast_steps)."""
        counts = self.expert_load.counts[self.layer] if self.expert_load is not None else None  # [E], on the device
        topk_ids, topk_weights = self.gate(h, counts, logits)  # [T, K] int64, [T, K] float32
        pending = dispatch.submit(self.layer, h, topk_ids, topk_weights)
        shared = None
        if self.shared is not None:  # computed while the routed experts are out
            shared = self.shared(h)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(h)) * shared
        yield
        out = dispatch.collect(pending)
        return out if shared is None else out + shared


class DecoderLayer(nn.Module):
    def __init__(self, input_norm: RMSNorm, attn: nn.Module, post_norm: RMSNorm, mlp: nn.Module) -> None:
        super().__init__()
        self.input_norm, self.attn, self.post_norm, self.mlp = input_norm, attn, post_norm, mlp

    @classmethod
    def load(cls, ld: Loader, i: int, spec: ModelSpec) -> DecoderLayer:
        prefix, eps = f"model.layers.{i}", spec.rms_norm_eps
        attention = LatentAttention if spec.attention.mla else Attention
        attn = attention.load(ld, f"{prefix}.self_attn", spec.attention, eps)
        if spec.is_moe_layer(i):
            mlp: nn.Module = MoeBlock.load(ld, i, spec)
        else:
            mlp = GatedMLP.load(ld, f"{prefix}.mlp", spec.hidden_act)
        return cls(RMSNorm.load(ld, f"{prefix}.input_layernorm", eps), attn,
                   RMSNorm.load(ld, f"{prefix}.post_attention_layernorm", eps), mlp)


class Backbone(nn.Module):
    # Fast path at GEMV sizes: add + RMSNorm inside the next GEMV's launch (off: MOEMESH_NORM_FOLD=0, an A/B check)
    fold_norms = os.environ.get("MOEMESH_NORM_FOLD", "1") != "0"

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: torch.Tensor | None, device: torch.device | str) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Parameter(embed, requires_grad=False)  # [V, H]
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = self.embed if lm_head is None else nn.Parameter(lm_head, requires_grad=False)  # [V, H]
        self.rotary = Rotary(spec.rope, device)
        self.fast = False  # CUDA: fused residual-add + RMSNorm and the fused attention/routing kernels (set_fast)
        self.packed_head = None  # backend packed: the LM head on torch's packed int8 kernel (packed_layers.py)

    def set_fast(self, on: bool) -> None:
        """Switch every module to the Triton kernels of gpu/fused_ops.py (CUDA) or back to the torch reference."""
        self.fast = on
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_fast(on and not self.rotary.interleaved and self.rotary.inv_freq.shape[0] * 2 ==
                                module.spec.head_dim)
            elif isinstance(module, Gate):
                module.set_fast(on)

    @classmethod
    def load(cls, ckpt: Checkpoint, spec: ModelSpec, device: torch.device | str, dtype: torch.dtype) -> Backbone:
        ld = Loader(ckpt, device, dtype)
        layers = [DecoderLayer.load(ld, i, spec) for i in range(spec.num_layers)]
        lm_head = None if spec.tie_word_embeddings else ld.tensor("lm_head.weight")
        norm = RMSNorm.load(ld, "model.norm", spec.rms_norm_eps)
        return cls(spec, ld.tensor("model.embed_tokens.weight"), layers, norm, lm_head, device)

    def cache_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-token, per-layer KV cache entry shapes (the two pools)."""
        attention = LatentAttention if self.spec.attention.mla else Attention
        return attention.cache_shapes(self.spec.attention)

    def forward(
        self,
        token_ids: torch.Tensor,  # [T] int64
        ctx: StepContext,
        dispatch: ExpertDispatch,
        pools: list[tuple[torch.Tensor, torch.Tensor]] | None = None,  # per layer; None: no cache
        logit_rows: torch.Tensor | None = None,  # [N] rows to compute logits for; None: all
    ) -> torch.Tensor:
        h = drive(self.hidden_steps(token_ids, ctx, dispatch, pools))  # [T, H] after the final norm
        if logit_rows is not None:
            h = h[logit_rows]
        return self.logits(h)  # [N, V]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, H] -> float32 logits [N, V]. On CUDA with bf16/fp16 weights cuBLAS writes float32 itself (no
        [N, V] half-precision copy and conversion kernel: at 128 rows of Qwen3's 151,936-token vocabulary, 117 MB of
        traffic less per step); elsewhere the half-precision product is converted."""
        if self.packed_head is not None:
            return self.packed_head(h).float()
        if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and self.lm_head.dtype == h.dtype:
            return torch.mm(h, self.lm_head.t(), out_dtype=torch.float32)
        return F.linear(h, self.lm_head).float()

    def hidden_steps(self, token_ids: torch.Tensor, ctx: StepContext, dispatch: ExpertDispatch,
                     pools: list | None = None) -> Generator[None, None, torch.Tensor]:
        """Every layer on token_ids [T] -> the final-normed hidden [T, H] (the generator's return value); yields
        once per MoE layer while its routed experts are out (MoeBlock.steps). forward() drives it to the end;
        micro_batch.py alternates two of them (ping-pong)."""
        x = F.embedding(token_ids, self.embed)  # [T, H]
        rope = self.rotary.table(ctx.positions, x.dtype)
        if self.fast:
            return (yield from self._fast_steps(x, rope, ctx, dispatch, pools))
        for i, layer in enumerate(self.layers):
            x = x + layer.attn(layer.input_norm(x), rope, self.rotary, ctx, pools[i] if pools is not None else None)
            h = layer.post_norm(x)
            mlp = (yield from layer.mlp.steps(h, dispatch)) if isinstance(layer.mlp, MoeBlock) else layer.mlp(h)
            x = x + mlp.to(x.dtype)  # routed experts may come back in float32 (LocalDispatch on the GPU)
        return self.norm(x)

    def _fast_steps(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: StepContext,
                    dispatch: ExpertDispatch, pools: list | None) -> Generator[None, None, torch.Tensor]:
        """hidden_steps() with each residual add fused into the next RMSNorm (one launch instead of ~8). At GEMV
        sizes (T <= dense_gemv.GEMV_MAX_ROWS) each add + norm folds further into the kernel that reads its output:
        the input norm into the q/k/v GEMV, the post-attention norm into the router logits (2 launches fewer per
        layer). x' (the residual) and h come out with the bits of add_rms_norm's."""
        from moemesh.runtime.gpu.dense_gemv import GEMV_MAX_ROWS
        from moemesh.runtime.gpu.fused_ops import add_rms_norm, router_logits_norm

        fold = self.fold_norms and x.shape[0] <= GEMV_MAX_ROWS
        delta = None  # [T, H] the last block's output, not yet added into the residual x
        for i, layer in enumerate(self.layers):
            pool = pools[i] if pools is not None else None
            if fold and isinstance(layer.attn, Attention) and layer.attn.fast:
                x, attn = layer.attn.forward_normed(x, delta, layer.input_norm, rope, ctx, pool)
            else:
                x, h = add_rms_norm(x, delta, layer.input_norm.weight, layer.input_norm.eps)
                attn = layer.attn(h, rope, self.rotary, ctx, pool)
            post, logits = layer.post_norm, None
            if fold and isinstance(layer.mlp, MoeBlock):
                x, h, logits = router_logits_norm(x, attn, post.weight, post.eps, layer.mlp.gate.weight)
            else:
                x, h = add_rms_norm(x, attn, post.weight, post.eps)
            if isinstance(layer.mlp, MoeBlock):
                delta = yield from layer.mlp.steps(h, dispatch, logits)
            else:
                delta = layer.mlp(h)
        return add_rms_norm(x, delta, self.norm.weight, self.norm.eps)[1]


def drive(steps: Generator[None, None, T]) -> T:
    """Runs a generator of hidden_steps()/MoeBlock.steps() to its end (no other work at its yields); its return."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
