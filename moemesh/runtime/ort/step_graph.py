"""A whole decode step as one ONNX Runtime call (the ORT backend's fast path for one-token-per-sequence steps).

OrtBackbone otherwise calls ORT once per decoder layer and runs attention in torch between the calls: at batch 1 on
two cores, about a third of a step is those torch ops and the calls' own overhead. Here every layer is in one graph:

    x [T, H] (embeddings), cos / sin [T, D], idx [T, P] (each token's past slots), mask [T, 1, 1, P + 1],
    pools k_l / v_l [S, Hkv, D] (bound zero-copy: the engine's paged KV pools)
      per layer: norm -> q, k, v (MatMulNBits) -> (q/k norm) -> rope
                 keys = Gather(k_l, idx) ++ k   [T, P + 1, Hkv, D]      # the past from the pool, then the new token
                 softmax(q keys^T * scale + mask) values -> o -> + x
                 norm -> dense FFN, or gate -> routing weights [T, E] -> every hosted expert side by side
      -> final norm -> logits [T, V];  k_new / v_new [L, T, Hkv, D]    # torch writes them into the pools after
Supported (else None and the per-layer path runs): SwiGLU, plain (rotate-half) rope, no MLA / fp8 cache / shared
experts, and MoE layers only where every token selects every hosted expert (the built-in smollm2-moe: top-8 of 8),
with softmax, sigmoid or unit scoring and no group limit or correction bias.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from moemesh.quant.packing import QWeight
from moemesh.runtime.ort.experts import _uniform, cat_rows
from moemesh.runtime.ort.graph import Builder, add_rms_norm, linear, rms_norm, silu_mul
from moemesh.runtime.ort.session import options, providers


def unsupported(base, moe_banks: dict | None) -> str:
    """'' when the step graph can be built for this backbone (moe_banks: layer -> expert triples, all hosted here)."""
    s = base.spec
    a = s.attention
    if a.mla or getattr(base.rotary, "interleaved", False):
        return "MLA or interleaved rope"
    if s.moe is not None:
        m = s.moe
        if moe_banks is None or m.top_k != m.num_experts or m.shared_intermediate_size or m.n_group > 1:
            return "routed experts not all local and all selected, or a shared expert or group limit"
        if m.scoring not in ("softmax", "sigmoid", "unit") or any(
                getattr(layer.mlp, "gate", None) is not None and layer.mlp.gate.correction_bias is not None
                for layer in base.layers):
            return f"scoring {m.scoring!r} with a correction bias"
    return ""


class StepGraph:
    """One InferenceSession for a whole decode step; run() binds the pools in place and returns the logits."""

    def __init__(self, backbone, weights: dict, moe_banks: dict | None, device: str = "cpu") -> None:
        self.base, self.spec = backbone.base, backbone.base.spec
        self.layers = len(self.base.layers)
        model = self._build(weights, moe_banks or {})
        self.session = ort.InferenceSession(model.SerializeToString(), options(), providers=providers(device))
        self.io = self.session.io_binding()
        self.bound_pools: tuple = ()
        self.bound_rows = 0  # T of the K/V output buffers bound
        self.rows = torch.empty(0)

    # ---- graph ---------------------------------------------------------------------------------------------

    def _build(self, weights: dict, moe_banks: dict):
        b, s = Builder(), self.spec
        a = s.attention
        x, delta, outputs = "x", None, []
        axes = lambda *v: b.const(np.array(v, np.int64))  # noqa: E731

        def norm(x, delta, rms):  # the residual add folded into the norm where there is one
            w = rms.weight
            return (x, rms_norm(b, x, w, rms.eps)) if delta is None else add_rms_norm(b, x, delta, w, rms.eps)
        for i, layer in enumerate(self.base.layers):
            x, h = norm(x, delta, layer.input_norm)
            q, k, v = self._qkv_heads(b, h, weights, i)  # [T, Hq, D], [T, Hkv, D] x2, q and k roped
            outputs += [(b.rename(k, f"k_new{i}"), f"k_new{i}"), (b.rename(v, f"v_new{i}"), f"v_new{i}")]
            o = self._attend(b, f"k_new{i}", f"v_new{i}", q, f"k{i}", f"v{i}", axes)  # [T, Hq * D]
            x, h = norm(x, self._proj(b, o, weights, i, "o"), layer.post_norm)
            delta = self._mlp(b, h, weights, i, layer, moe_banks.get(i), axes)
        x, h = norm(x, delta, self.base.norm)
        logits = linear(b, h, weights["head"], None, "head")
        pool = ["S", a.num_kv_heads, a.head_dim]
        inputs = [("x", ["T", s.hidden_size]), ("cos", ["T", 1, a.head_dim]), ("sin", ["T", 1, a.head_dim]),
                  ("idx", ["T", "P"], np.int64), ("mask", ["T", 1, 1, "P1"])]
        inputs += [(f"{kv}{i}", pool) for i in range(self.layers) for kv in "kv"]
        return b.model(inputs, [(logits, "logits"), *outputs])

    def _qkv_heads(self, b: Builder, h: str, weights: dict, i: int) -> list[str]:
        """q [T, Hq, D], k, v [T, Hkv, D], q and k roped. q, k and v are one MatMulNBits where their bits and groups
        agree (one zero-point correction, one thread-pool dispatch); without q/k norm or clipping, q and k are also
        roped as one [T, Hq + Hkv, D] tensor."""
        attn, sa = self.base.layers[i].attn, self.spec.attention
        parts = [weights[f"model.layers.{i}.self_attn.{n}_proj.weight"] for n in "qkv"]
        if not (all(isinstance(p, QWeight) for p in parts) and _uniform(parts)):
            return self._qk(b, attn, *(self._proj(b, h, weights, i, n) for n in "qkv"))
        biases = [getattr(attn, f"{n}_proj").bias for n in "qkv"]
        bias = None if all(x is None for x in biases) else torch.cat(
            [x.detach().float() if x is not None else torch.zeros(p.shape[0]) for x, p in zip(biases, parts)])
        y = linear(b, h, cat_rows(parts), bias, "qkv")
        sizes = [p.shape[0] for p in parts]
        if sa.qk_norm is not None or sa.clip_qkv is not None:
            return self._qk(b, attn, *b.op_n("Split", [y, b.const(np.array(sizes, np.int64))], 3, axis=-1))
        qk, v = b.op_n("Split", [y, b.const(np.array([sizes[0] + sizes[1], sizes[2]], np.int64))], 2, axis=-1)
        qk = self._rope(b, b.op("Reshape", [qk, b.const(np.array([0, -1, sa.head_dim], np.int64))]))
        q, k = b.op_n("Split", [qk, b.const(np.array([sa.num_heads, sa.num_kv_heads], np.int64))], 2, axis=1)
        return [q, k, b.op("Reshape", [v, b.const(np.array([0, sa.num_kv_heads, sa.head_dim], np.int64))])]

    def _proj(self, b: Builder, h: str, weights: dict, i: int, name: str) -> str:
        proj = getattr(self.base.layers[i].attn, f"{name}_proj")
        return linear(b, h, weights[f"model.layers.{i}.self_attn.{name}_proj.weight"], proj.bias, name)

    def _qk(self, b: Builder, attn, q: str, k: str, v: str) -> tuple[str, str, str]:
        """The torch Attention's steps between the projections and the context: q/k norm, clip, heads, rope."""
        s = attn.spec
        if s.qk_norm == "full":
            q = rms_norm(b, q, attn.q_norm.weight, attn.q_norm.eps)
            k = rms_norm(b, k, attn.k_norm.weight, attn.k_norm.eps)
        if s.clip_qkv is not None:
            lo, hi = b.const(np.array(-s.clip_qkv, np.float32)), b.const(np.array(s.clip_qkv, np.float32))
            q, k, v = (b.op("Clip", [z, lo, hi]) for z in (q, k, v))
        q, k, v = (b.op("Reshape", [z, b.const(np.array([0, n, s.head_dim], np.int64))])
                   for z, n in ((q, s.num_heads), (k, s.num_kv_heads), (v, s.num_kv_heads)))
        if s.qk_norm == "head":
            q = rms_norm(b, q, attn.q_norm.weight, attn.q_norm.eps)
            k = rms_norm(b, k, attn.k_norm.weight, attn.k_norm.eps)
        return self._rope(b, q), self._rope(b, k), v

    @staticmethod
    def _rope(b: Builder, x: str) -> str:
        """x * cos + rotate_half(x) * sin over [T, heads, D]: cos [T, 1, D] and sin [T, 1, D] with its first half
        negated (run), so rotate_half's minus is in the table: (x2, x1) * sin'."""
        x1, x2 = b.op_n("Split", [x], 2, axis=-1)  # opset 17: equal halves
        return b.op("Add", [b.op("Mul", [x, "cos"]), b.op("Mul", [b.op("Concat", [x2, x1], axis=-1), "sin"])])

    def _attend(self, b: Builder, k: str, v: str, q: str, k_pool: str, v_pool: str, axes) -> str:
        """One query token per row over its past (the pool rows idx) and itself: [T, Hq * D]."""
        s = self.spec.attention
        keys = b.op("Concat", [b.op("Gather", [k_pool, "idx"], axis=0), b.op("Unsqueeze", [k, axes(1)])], axis=1)
        vals = b.op("Concat", [b.op("Gather", [v_pool, "idx"], axis=0), b.op("Unsqueeze", [v, axes(1)])], axis=1)
        group = s.num_heads // s.num_kv_heads
        qg = b.op("Reshape", [q, b.const(np.array([0, s.num_kv_heads, group, s.head_dim], np.int64))])
        scores = b.op("MatMul", [qg, b.op("Transpose", [keys], perm=[0, 2, 3, 1])])  # [T, Hkv, G, P + 1]
        scores = b.op("Add", [b.op("Mul", [scores, b.const(np.array(s.scale, np.float32))]), "mask"])
        out = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), b.op("Transpose", [vals], perm=[0, 2, 1, 3])])
        return b.op("Reshape", [out, b.const(np.array([0, s.num_heads * s.head_dim], np.int64))])

    def _mlp(self, b: Builder, h: str, weights: dict, i: int, layer, bank, axes) -> str:
        if bank is None:  # dense FFN: gate and up stacked where they can be (as _qkv)
            p = f"model.layers.{i}.mlp"
            gate, up = (weights[f"{p}.{n}_proj.weight"] for n in ("gate", "up"))
            if isinstance(gate, QWeight) and isinstance(up, QWeight) and _uniform([gate, up]):
                gate, up = b.op_n("Split", [linear(b, h, cat_rows([gate, up]), None, "gate_up")], 2, axis=-1)
            else:
                gate, up = linear(b, h, gate, None, "gate"), linear(b, h, up, None, "up")
            return linear(b, silu_mul(b, gate, up), weights[f"{p}.down_proj.weight"], None, "down")
        m = self.spec.moe
        logits = b.matmul_f(h, layer.mlp.gate.weight, "router")  # [T, E] float32
        if m.scoring == "unit":
            w = b.op("Add", [b.op("Mul", [logits, b.const(np.array(0.0, np.float32))]),
                             b.const(np.array(1.0, np.float32))])
        else:
            w = b.op("Softmax", [logits], axis=-1) if m.scoring == "softmax" else b.op("Sigmoid", [logits])
            if m.norm_topk_prob:
                total = b.op("ReduceSum", [w, axes(-1)], keepdims=1)
                if m.scoring == "sigmoid":
                    total = b.op("Add", [total, b.const(np.array(1e-20, np.float32))])
                w = b.op("Div", [w, total])
            if m.routed_scaling_factor != 1.0:
                w = b.op("Mul", [w, b.const(np.array(m.routed_scaling_factor, np.float32))])
        return bank(b, h, w)

    # ---- run ------------------------------------------------------------------------------------------------

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor,
            pools: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, V], k_new, v_new [L, T, Hkv, D]: the new tokens' K/V for the caller to write into the
        pools). cos / sin [T, D] (rotate-half tables); pools [(k, v)] per layer, read in place. The binding is kept
        between calls: the pools (which never move) and each step size's K/V buffers are bound once (binding all
        of them every step took ~1.5 ms on two cores, a tenth of the step)."""
        half, t = cos.shape[1] // 2, x.shape[0]
        sin = torch.cat((-sin[:, :half], sin[:, half:]), 1)  # rotate_half's sign (see _rope)
        feeds = {"x": x, "cos": cos[:, None], "sin": sin[:, None], "idx": idx, "mask": mask}
        feeds = {name: z.contiguous() for name, z in feeds.items()}  # held until the call returns
        for name, z in feeds.items():
            _bind(self.io, name, z)
        pointers = tuple(z.data_ptr() for pair in pools for z in pair)
        if pointers != self.bound_pools:
            for i, (k_pool, v_pool) in enumerate(pools):
                _bind(self.io, f"k{i}", k_pool)
                _bind(self.io, f"v{i}", v_pool)
            self.bound_pools = pointers
        if t != self.bound_rows:
            a = self.spec.attention
            self.rows = torch.empty(2, self.layers, t, a.num_kv_heads, a.head_dim)  # [k / v, L, T, Hkv, D]
            for i in range(self.layers):
                _bind(self.io, f"k_new{i}", self.rows[0, i], output=True)
                _bind(self.io, f"v_new{i}", self.rows[1, i], output=True)
            self.bound_rows = t
        logits = torch.empty(t, self.base.lm_head.shape[0], dtype=torch.float32)
        _bind(self.io, "logits", logits, output=True)
        self.session.run_with_iobinding(self.io)
        return logits, self.rows[0], self.rows[1]


_NP = {torch.float32: np.float32, torch.int64: np.int64}


def _bind(io, name: str, t: torch.Tensor, output: bool = False) -> None:
    """A contiguous CPU tensor's memory as an input or output of the call (no copy)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous to bind in place")
    bind = io.bind_output if output else io.bind_input
    bind(name, "cpu", 0, _NP[t.dtype], list(t.shape), t.data_ptr())
