"""The ONNX Runtime backbone: the torch Backbone's dense layers as a few ORT graphs per decoder layer, weights in
int4/int8 (MatMulNBits). Attention itself (rope, paged KV cache, SDPA) and MoE routing stay in torch.

Per decoder layer i (H hidden, A = Hq*D attention width):
    pre_i   (x [T, H])            -> q, k, v        input RMSNorm + q/k/v projections (layer 0 and after MoE layers)
    tail_i  (x [T, H], attn [T, A]) -> dense layer: x' = x + o(attn); x'' = x' + FFN(norm(x'));
                                      outputs x'' and q, k, v of layer i+1 (its pre fused in: one call per layer)
                                    -> MoE layer: outputs x' and h = norm(x') (experts go through the dispatch)
    head    (x [N, H])            -> logits [N, V]  final RMSNorm + LM head (int8)
So a dense model costs one ORT call per layer per step, plus the head. Decode steps (one new token per sequence)
run instead as one call for the whole model where step_path.py allows (step_graph.py: the same weights, attention
in the graph, every expert in process and selected): at batch 1 on two cores that took the built-in smollm2-moe
from 38.3 to 16.3 ms a token (benchmarks/results/cpu-quant-smollm2-moe.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.quant.grid import on_grid
from moemesh.quant.packing import QWeight, rtn
from moemesh.runtime.attention import Attention
from moemesh.runtime.backbone import Backbone, MoeBlock
from moemesh.runtime.ort.graph import Builder, linear, rms_norm, schemes, silu_mul
from moemesh.runtime.ort.session import Graph
from moemesh.runtime.ort.step_path import StepPath

Weights = Callable[[str, torch.Tensor], "QWeight | torch.Tensor"]  # checkpoint name, float weight -> what to run
SMALL_STEP = 16  # steps of at most this many tokens run torch (attention) on one thread: see forward
# The LM head (tied embeddings too) in int8: 4x fewer bytes than float32, ~0 perplexity cost.
HEAD_BITS = int(os.environ.get("MOEMESH_ORT_HEAD_BITS", 8))


def default_weights(quantized: dict[str, QWeight], bits: int = 8, group: int = 32) -> Weights:
    """The checkpoint's own QWeight where it has one, else a float weight's exact int4 codes where it lies on a 4-bit
    grid (quant/grid.on_grid: the built-in's GGUF-born projections, as the packed backend keeps them), else
    round-to-nearest `bits` (float when K % group)."""
    def pick(name: str, w: torch.Tensor):
        if name in quantized:
            return quantized[name]
        return float_weight(w, bits, group)
    return pick


def float_weight(w: torch.Tensor, bits: int = 8, group: int = 32) -> QWeight | torch.Tensor:
    """What ORT runs for a float weight [N, K]: its exact int4 grid codes, else round-to-nearest `bits`, else (K not
    whole groups) the float weight."""
    if w.shape[1] % group:
        return w.float()
    return on_grid(w) or rtn(w.float(), bits, group)


def supported(backbone: Backbone) -> str:
    """'' when the ORT backbone can run this model, else why not."""
    s = backbone.spec
    if s.attention.mla:
        return "multi-head latent attention (MLA) is not built for ONNX Runtime"
    if s.hidden_act != "silu":
        return f"activation {s.hidden_act!r} (the ORT graphs are SwiGLU)"
    return ""


class OrtBackbone(nn.Module):
    """Drop-in for Backbone in Engine (same forward); built from a loaded torch Backbone."""

    def __init__(self, base: Backbone, weights: Weights, device: str = "cpu") -> None:
        super().__init__()
        why = supported(base)
        if why:
            raise ValueError(f"--backend onnxruntime: {why}")
        self.base, self.spec, self.rotary = base, base.spec, base.rotary
        self.embed = base.embed  # [V, H] float: a lookup reads one row per token
        self.fast = False
        picked: dict = {}  # checkpoint name -> what the graphs run, kept for the step graph (built on first use)

        choose = weights

        def remember(name: str, w: torch.Tensor):
            if name not in picked:
                picked[name] = choose(name, w)
            return picked[name]
        weights = remember
        self.moe = [isinstance(layer.mlp, MoeBlock) for layer in base.layers]
        n = len(base.layers)
        self.pre = {i: Graph(self._pre(i, weights), device) for i in range(n) if i == 0 or self.moe[i - 1]}
        self.tail = [Graph(self._tail(i, weights), device) for i in range(n)]
        head = base.lm_head.detach().float()
        # Symmetric: exact for Q8_0-born embeddings (the built-in model's), round-to-nearest otherwise.
        picked["head"] = rtn(head, HEAD_BITS, 32, symmetric=True) if head.shape[1] % 32 == 0 else head
        self.head = Graph(self._head(picked["head"]), device)
        self.step_path = StepPath(self, picked, device)
        self.schemes = schemes(picked.values())  # Router.Info (engine_loader._reported)
        self.attend = [Attention(a.spec, a.q_proj, a.k_proj, a.v_proj, nn.Identity(), a.q_norm, a.k_norm)
                       for a in (layer.attn for layer in base.layers)]  # o_proj is in the tail graph
        self._drop_float_weights()

    def _drop_float_weights(self) -> None:
        """The graphs hold their own copies: free the float projections and dense FFNs (MoE gates and shared
        experts stay, torch runs them)."""
        for layer in self.base.layers:
            mods = [layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.o_proj]
            if not isinstance(layer.mlp, MoeBlock):
                mods += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
            for m in mods:
                m.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def set_fast(self, on: bool) -> None:  # the CUDA Triton kernels do not apply to ORT graphs
        self.fast = False

    def cache_shapes(self):
        return self.base.cache_shapes()

    # ---- graphs ---------------------------------------------------------------------------------------------

    def _qkv(self, b: Builder, x: str, i: int, weights: Weights) -> list[str]:
        layer, p = self.base.layers[i], f"model.layers.{i}.self_attn"
        h = rms_norm(b, x, layer.input_norm.weight.detach().numpy(), layer.input_norm.eps)
        outs = []
        for name in "qkv":
            proj = getattr(layer.attn, f"{name}_proj")
            bias = proj.bias.detach().numpy() if proj.bias is not None else None
            outs.append(linear(b, h, weights(f"{p}.{name}_proj.weight", proj.weight.detach()), bias, name))
        return outs

    def _pre(self, i: int, weights: Weights):
        b = Builder()
        q, k, v = self._qkv(b, "x", i, weights)
        return b.model([("x", ["T", self.spec.hidden_size])], [(q, "q"), (k, "k"), (v, "v")])

    def _tail(self, i: int, weights: Weights):
        b, layer = Builder(), self.base.layers[i]
        o = layer.attn.o_proj
        x1 = b.op("Add", ["x", linear(b, "attn", weights(f"model.layers.{i}.self_attn.o_proj.weight",
                                                           o.weight.detach()),
                                      o.bias.detach().numpy() if o.bias is not None else None, "o")])
        h = rms_norm(b, x1, layer.post_norm.weight.detach().numpy(), layer.post_norm.eps)
        width = self.spec.attention.num_heads * self.spec.attention.head_dim
        inputs = [("x", ["T", self.spec.hidden_size]), ("attn", ["T", width])]
        if self.moe[i]:
            return b.model(inputs, [(x1, "x_out"), (h, "h")])
        mlp, p = layer.mlp, f"model.layers.{i}.mlp"
        gate, up = (linear(b, h, weights(f"{p}.{n}_proj.weight", getattr(mlp, f"{n}_proj").weight.detach()), None, n)
                    for n in ("gate", "up"))
        down = linear(b, silu_mul(b, gate, up), weights(f"{p}.down_proj.weight", mlp.down_proj.weight.detach()),
                      None, "down")
        x2 = b.op("Add", [x1, down])
        outputs = [(x2, "x_out")]
        if i + 1 < len(self.base.layers):
            outputs += list(zip(self._qkv(b, x2, i + 1, weights), ("q", "k", "v")))
        return b.model(inputs, outputs)

    def _head(self, weight):
        b = Builder()
        h = rms_norm(b, "x", self.base.norm.weight.detach().numpy(), self.base.norm.eps)
        return b.model([("x", ["N", self.spec.hidden_size])], [(linear(b, h, weight, None, "head"), "logits")])

    # ---- forward --------------------------------------------------------------------------------------------

    def forward(self, token_ids: torch.Tensor, ctx, dispatch, pools=None, logit_rows=None) -> torch.Tensor:
        """Backbone.forward. Decode-sized steps run the torch ops on one thread: with two, torch's OpenMP workers
        and ORT's pool take turns spinning on the same cores (SDPA of one token: 260 us vs 18 us, measured)."""
        threads = torch.get_num_threads()
        if token_ids.numel() <= SMALL_STEP:
            torch.set_num_threads(1)
        try:
            return self._forward(token_ids, ctx, dispatch, pools, logit_rows)
        finally:
            torch.set_num_threads(threads)

    def _forward(self, token_ids: torch.Tensor, ctx, dispatch, pools, logit_rows) -> torch.Tensor:
        x = F.embedding(token_ids, self.embed).float()  # [T, H]
        rope = self.rotary.table(ctx.positions, x.dtype)
        logits = self.step_path.run(x, rope, ctx, dispatch, pools)  # a whole decode step in one call, where it can
        if logits is not None:
            return logits if logit_rows is None else logits[logit_rows]
        q, k, v = self.pre[0].run(x=x)
        for i, layer in enumerate(self.base.layers):
            attn = self._attention(i, q, k, v, rope, ctx, pools[i] if pools is not None else None)  # [T, A]
            outs = self.tail[i].run(x=x, attn=attn)
            if self.moe[i]:
                x, h = outs
                x = x + layer.mlp(h, dispatch).float()
                if i + 1 < len(self.base.layers):
                    q, k, v = self.pre[i + 1].run(x=x)
            else:
                x, *qkv = outs
                q, k, v = qkv if qkv else (None, None, None)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.head.run(x=x)[0]  # [N, V] float32

    def _attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, ctx, pools) -> torch.Tensor:
        """Attention.forward after the projections, without o_proj (it is in the tail graph)."""
        att, t = self.attend[i], q.shape[0]
        s = att.spec
        if s.qk_norm == "full":
            q, k = att.q_norm(q), att.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (z.clamp(-s.clip_qkv, s.clip_qkv) for z in (q, k, v))
        q, k, v = q.view(t, s.num_heads, s.head_dim), k.view(t, s.num_kv_heads, s.head_dim), v.view(
            t, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = att.q_norm(q), att.k_norm(k)
        cos, sin = rope
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        if getattr(ctx, "paged_decode", False):
            return ctx.attend(q, k, v, pools, s.scale).reshape(t, s.num_heads * s.head_dim)
        return att._sdpa(q, k, v, ctx, pools)  # o_proj is Identity here: [T, A]
