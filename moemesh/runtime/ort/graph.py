"""Builds small ONNX graphs around ORT's weight-only integer matmul (com.microsoft MatMulNBits).

MatMulNBits computes Y = A @ dequant(B)^T for B [N, K] stored as uint8 blobs [N, K/block, block*bits/8],
scales [N * K/block] and packed uint8 zero points; weights live inside the graph as initializers, so a session
call passes only activations.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from moemesh.quant.packing import QWeight, pack_nibbles

def as_array(t) -> np.ndarray:
    """A weight as the graph stores it: a (CPU) torch tensor's float32 values, or a numpy array as it is; read once
    when a graph is built, never per step."""
    return t.detach().float().contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
# accuracy_level 4: activations quantized to int8 per block inside the kernel (the fast AVX2/AVX512-VNNI path);
# 0 keeps float activations. Chosen per session (Builder.accuracy).


class Builder:
    """Accumulates nodes/initializers; names are unique per builder."""

    def __init__(self, accuracy: int | None = None) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.accuracy = int(os.environ.get("MOEMESH_ORT_ACCURACY", 4)) if accuracy is None else accuracy
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, array, stem: str = "c") -> str:
        """A numpy array (kept as it is) or a torch tensor (as_array) as an initializer."""
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(as_array(array)), name))
        return name

    def op(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain or None, **attrs))
        return out

    def op_n(self, op_type: str, inputs: list[str], outputs: int, **attrs) -> list[str]:
        """A node with several outputs (Split)."""
        outs = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs

    def matmul_q(self, x: str, qw: QWeight, stem: str = "w") -> str:
        """x [..., K] @ W^T -> [..., N] with W stored in qw.bits bits, block qw.group. Fractional zero points
        (qw.zero_f, GGUF Q4_1-born weights) run the kernel with the middle code as every zero and add the rest
        after (_zero_correction; float zero points run ~30x slower on this CPU). Measured on the built-in
        smollm2-moe's `grid` int4 checkpoint against the rounded zero points plus a correction (before
        2026-12-01): decode step 16.6 -> 13.9 ms; perplexity (wikitext2 / second text, 2,048 tokens) +0.38% /
        +0.77% -> +0.15% / -0.03% of float32 (the int8 activations' rounding meets smaller codes)."""
        n, k = qw.shape
        blocks = k // qw.group
        codes = qw.q.numpy().reshape(n, blocks, qw.group)
        blob = pack_nibbles(codes) if qw.bits == 4 else codes.astype(np.uint8)
        middle = qw.zero_f is not None
        zeros = np.full((n, blocks), 1 << (qw.bits - 1), np.uint8) if middle else np.asarray(qw.zero, np.uint8)
        if qw.bits == 4:
            if blocks % 2:
                zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
            zeros = pack_nibbles(zeros)
        ins = [x, self.const(blob, stem + "_q"), self.const(qw.scale.numpy().astype(np.float32).reshape(-1),
                                                           stem + "_s"), self.const(zeros.reshape(-1), stem + "_z")]
        y = self.op("MatMulNBits", ins, domain="com.microsoft", K=k, N=n, bits=qw.bits, block_size=qw.group,
                    accuracy_level=self.accuracy)
        return self.op("Gemm", [*self._zero_correction(x, qw, stem), y]) if middle else y  # y + sums @ c

    def _zero_correction(self, x: str, qw: QWeight, stem: str) -> tuple[str, str]:
        """Fractional zero points, the kernel run with the middle code m as zero: (q - z_f) s = (q - m) s +
        (m - z_f) s, so y gains sum_g (sum_{k in g} x_k) c[n, g] with c = (m - z_f) s [N, G]: (the group sums
        [T, G], c^T [G, N]) for one Gemm that also adds y (x 2D: G = K / group, 18 for K = 576)."""
        n, k = qw.shape
        c = as_array((float(1 << (qw.bits - 1)) - qw.zero_f) * qw.scale)  # [N, G]
        groups = self.op("Reshape", [x, self.const(np.array([-1, k // qw.group, qw.group], np.int64))])
        sums = self.op("ReduceSum", [groups, self.const(np.array([-1], np.int64))], keepdims=0)  # [T, G]
        return sums, self.const(np.ascontiguousarray(c.T), stem + "_zc")  # [T, G], [G, N]

    def matmul_f(self, x: str, w, stem: str = "w") -> str:
        """x @ w.T for a float weight w [N, K] (kept float32: layers the caller chose not to quantize)."""
        return self.op("MatMul", [x, self.const(np.ascontiguousarray(as_array(w).T.astype(np.float32)), stem)])

    def rename(self, value: str, name: str) -> str:
        """value (a node output) renamed to name everywhere: a graph output without an Identity node's copy."""
        for node in self.nodes:
            for names in (node.input, node.output):
                for j, n in enumerate(names):
                    if n == value:
                        names[j] = name
        return name

    def model(self, inputs: list[tuple], outputs: list[tuple[str, str]]) -> onnx.ModelProto:
        """inputs: (name, shape with str for dynamic dims[, numpy dtype: float32 unless given]); outputs: (graph
        value, output name)."""
        outs = []
        for value, name in outputs:
            if value != name:
                self.nodes.append(helper.make_node("Identity", [value], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        ins = [helper.make_tensor_value_info(i[0], helper.np_dtype_to_tensor_dtype(np.dtype(i[2]))
                                             if len(i) > 2 else TensorProto.FLOAT, i[1]) for i in inputs]
        graph = helper.make_graph(self.nodes, "moemesh", ins, outs, self.inits)
        return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


def rms_norm(b: Builder, x: str, weight, eps: float) -> str:
    """weight * x / sqrt(mean(x^2) + eps) over the last axis (SimplifiedLayerNormalization: ORT's RMSNorm kernel)."""
    return b.op("SimplifiedLayerNormalization", [x, b.const(as_array(weight).astype(np.float32), "norm")], axis=-1,
                epsilon=float(eps), stash_type=1)


def schemes(weights) -> set[str]:
    """Router.Info's words for what graphs run: "int4 grid" (fractional zero points), "int4", "int8", "float32"."""
    return {("int4 grid" if w.zero_f is not None else f"int{w.bits}") if isinstance(w, QWeight) else "float32"
            for w in weights}


def add_rms_norm(b: Builder, x: str, delta: str, weight, eps: float) -> tuple[str, str]:
    """(x + delta, rms_norm(x + delta)) in one node (com.microsoft SkipSimplifiedLayerNormalization)."""
    h, total = b.name("norm"), b.name("residual")
    b.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, delta, b.const(
        as_array(weight).astype(np.float32), "norm")], [h, "", "", total], domain="com.microsoft", epsilon=float(eps)))
    return total, h


def silu_mul(b: Builder, gate: str, up: str) -> str:
    """silu(gate) * up (SwiGLU); the only FFN activation the ORT backend builds (checked at load)."""
    return b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])


def linear(b: Builder, x: str, weight, bias=None, stem: str = "w") -> str:
    """x @ W^T (+ bias); weight a QWeight (MatMulNBits) or a float [N, K] array or tensor (plain MatMul)."""
    y = b.matmul_q(x, weight, stem) if isinstance(weight, QWeight) else b.matmul_f(x, weight, stem)
    return b.op("Add", [y, b.const(as_array(bias).astype(np.float32), stem + "_b")]) if bias is not None else y
