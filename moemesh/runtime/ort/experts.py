"""Routed experts on ONNX Runtime: ExpertBank's forward contract (what an expert shard or LocalDispatch calls) with
int4/int8 MatMulNBits weights.

Per hosted MoE layer two kinds of graph:
    bank_l    (h [T, H], w [T, E_local]) -> [T, H]   every hosted expert side by side as one SwiGLU of E_local*I
              neurons, each neuron scaled by its expert's routing weight (w = 0 where not selected): used when
              every token selected every hosted expert (the built-in smollm2-moe: top-8 of 8), like
              ExpertBank._all_selected
    expert_le (x [n, H]) -> [n, H]                   one expert, run on its routed tokens (sparse routing)
Weights: the checkpoint's own QWeights (int4/int8 checkpoints), else round-to-nearest int8, group 32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moemesh.quant.grid import on_grid
from moemesh.quant.packing import QWeight, rtn
from moemesh.runtime.checkpoint import Checkpoint, resolve_model_dir
from moemesh.runtime.experts import PER_EXPERT_NAMES, ExpertBank, moe_prefix
from moemesh.runtime.ort.graph import Builder, linear, schemes, silu_mul
from moemesh.runtime.ort.session import Graph


def _cat(parts: list[QWeight], dim: int) -> QWeight:
    """Concatenate codes, scales and zero points along dim; fractional zero points (grid.py) are kept, an integer
    part standing in with its own zeros where only some parts have them."""
    zero_f = None
    if any(p.zero_f is not None for p in parts):
        zero_f = torch.cat([p.zero.float() if p.zero_f is None else p.zero_f for p in parts], dim)
    return QWeight(torch.cat([p.q for p in parts], dim), torch.cat([p.scale for p in parts], dim),
                   torch.cat([p.zero for p in parts], dim), parts[0].bits, parts[0].group, zero_f)


def cat_rows(parts: list[QWeight]) -> QWeight:
    """Stack along N (output rows): experts' gate (or up) projections side by side."""
    return _cat(parts, 0)


def cat_cols(parts: list[QWeight]) -> QWeight:
    """Concatenate along K (input columns, whole groups): the experts' down projections as one [H, E*I]."""
    return _cat(parts, 1)


def _uniform(parts: list[QWeight]) -> bool:
    return len({(p.bits, p.group) for p in parts}) == 1 and parts[0].q.shape[1] % parts[0].group == 0


class OrtExpertBank:
    """Same attributes and forward as ExpertBank (experts, layers, spec, local_index, dtype float32, device cpu)."""

    def __init__(self, bank: ExpertBank, weights: dict[tuple[int, int], tuple[QWeight, QWeight, QWeight]],
                 device: str = "cpu") -> None:
        if bank.spec.hidden_act != "silu":
            raise ValueError(f"--backend onnxruntime: experts with activation {bank.spec.hidden_act!r} (SwiGLU only)")
        self.spec, self.experts, self.layers = bank.spec, bank.experts, bank.layers
        self.local_index, self.read_names = bank.local_index, bank.read_names
        self.dtype, self.device, self.fused_off = torch.float32, torch.device("cpu"), "onnxruntime backend"
        self.weight_bytes = sum(q.q.numel() * q.bits // 8 + q.scale.numel() * 4 for t in weights.values() for q in t)
        self.single = {key: Graph(self._expert_graph(*w), device) for key, w in weights.items()}
        # for bank_nodes (a step graph in the process that hosts every expert); released once the graph is built
        self.weights = weights if len(self.experts) == bank.spec.num_experts else {}
        self.schemes = schemes(q for t in weights.values() for q in t)  # Router.Info (engine_loader._reported)

        self.bank = {layer: Graph(self._bank_graph([weights[(layer, e)] for e in self.experts]), device)
                     for layer in self.layers
                     if _uniform([weights[(layer, e)][2] for e in self.experts])}

    @classmethod
    def load(cls, model_dir: str | Path, experts=None, layers=None, device: str = "cpu", spec=None,
             load_format: str = "auto", bits: int = 8) -> OrtExpertBank:
        """The hosted experts' QWeights from an int4/int8 checkpoint, else a float weight's exact int4 codes where
        it lies on a 4-bit grid (quant/grid.on_grid), else `bits` round-to-nearest."""
        bank = ExpertBank.load(model_dir, experts=experts, layers=layers, spec=spec, load_format=load_format)
        weights = {}
        with Checkpoint(resolve_model_dir(model_dir)) as ckpt:
            for layer in bank.layers:
                prefix = moe_prefix(ckpt, layer)
                for row, e in enumerate(bank.experts):
                    gate_up, down = bank.gate_up[layer][row], bank.down[layer][row]  # [2I, H], [H, I]
                    floats = (*gate_up.chunk(2), down)
                    names = _names(ckpt, prefix, e)
                    weights[(layer, e)] = tuple(
                        ckpt.quant.qweight(n, ckpt._raw) if ckpt.quant is not None and n and n in ckpt.quant
                        else on_grid(w) or rtn(w.float(), bits, 32) for n, w in zip(names, floats))
        return cls(bank, weights, device)

    @staticmethod
    def _expert_graph(gate: QWeight, up: QWeight, down: QWeight):
        b = Builder()
        act = silu_mul(b, linear(b, "x", gate, None, "gate"), linear(b, "x", up, None, "up"))
        return b.model([("x", ["T", gate.shape[1]])], [(linear(b, act, down, None, "down"), "y")])

    @staticmethod
    def _bank_graph(triples: list[tuple[QWeight, QWeight, QWeight]]):
        b = Builder()
        y = bank_body(b, triples, "h", "w")
        return b.model([("h", ["T", triples[0][0].shape[1]]), ("w", ["T", len(triples)])], [(y, "y")])

    def bank_nodes(self, layer: int):
        """(builder, h, w) -> y: this layer's bank as nodes of a caller's graph (step_graph.py), or None where
        the layer has no bank graph (its experts' quantization differs)."""
        if layer not in self.bank or not self.weights:
            return None
        triples = [self.weights[(layer, e)] for e in self.experts]
        return lambda b, h, w: bank_body(b, triples, h, w)

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, K] global ids (-1 unused), topk_weights [T, K] -> [T, H] in hidden's dtype."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not hosted here (hosted: {self.layers})")
        ids = topk_ids.to("cpu", torch.int64)
        local = torch.where(ids >= 0, self.local_index[ids.clamp(min=0)], -1)  # [T, K]
        w = torch.zeros(hidden.shape[0], len(self.experts))  # [T, E_local] routing weight per hosted expert
        slot = local >= 0
        w[slot.nonzero()[:, 0], local[slot]] = topk_weights.to("cpu", torch.float32)[slot]
        x = hidden.to("cpu", torch.float32)
        if layer in self.bank and bool(slot.sum(1).eq(len(self.experts)).all()):
            return self.bank[layer].run(h=x, w=w)[0].to(hidden.device, hidden.dtype)
        out = torch.zeros(x.shape)
        for row, e in enumerate(self.experts):
            tokens = w[:, row].nonzero().squeeze(1)  # [n]
            if tokens.numel():
                y = self.single[(layer, e)].run(x=x[tokens])[0]
                out.index_add_(0, tokens, y * w[tokens, row, None])
        return out.to(hidden.device, hidden.dtype)

    __call__ = forward

    def release_weights(self) -> None:
        """Frees the QWeights kept for bank_nodes (the graphs hold their own copies)."""
        self.weights = {}


def bank_body(b: Builder, triples: list[tuple[QWeight, QWeight, QWeight]], h: str, w: str) -> str:
    """Every expert of triples side by side as one SwiGLU of E*I neurons, each scaled by its expert's routing weight:
    h [T, H], w [T, E] -> y [T, H]."""
    e, inter = len(triples), triples[0][0].shape[0]
    gate_up = linear(b, h, cat_rows([t[0] for t in triples] + [t[1] for t in triples]), None, "gate_up")
    gate, up = b.op_n("Split", [gate_up], 2, axis=-1)  # [T, E*I] each: one MatMulNBits for both
    act = b.op("Reshape", [silu_mul(b, gate, up), b.const(np.array([0, e, inter], np.int64))])  # [T, E, I]
    act = b.op("Mul", [act, b.op("Unsqueeze", [w, b.const(np.array([2], np.int64))])])
    act = b.op("Reshape", [act, b.const(np.array([0, e * inter], np.int64))])  # [T, E*I]
    return linear(b, act, cat_cols([t[2] for t in triples]), None, "down")  # [T, H]


def _names(ckpt: Checkpoint, prefix: str, e: int) -> tuple[str | None, ...]:
    for gate, up, down in PER_EXPERT_NAMES:
        base = f"{prefix}.experts.{e}"
        if f"{base}.{gate}.weight" in ckpt:
            return tuple(f"{base}.{n}.weight" for n in (gate, up, down))
    return (None, None, None)  # fused layouts: no per-expert quantized tensors, the float slices are quantized here
