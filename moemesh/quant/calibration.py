"""Calibration statistics for GPTQ/AWQ: per quantized Linear, the input Hessian sum(x x^T) over calibration tokens,
recorded while the float model (the torch runtime) runs the calibration text.

Keys are checkpoint weight names (`model.layers.3.self_attn.q_proj.weight`). Routed experts are calibrated on the
tokens routed to them (the dispatch sees the router's choice); an expert that receives fewer than `min_tokens`
falls back to the Hessian of every token of its layer (FALLBACK below), so rarely chosen experts still get a
well-conditioned Hessian instead of noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moemesh.runtime.backbone import MoeBlock
from moemesh.runtime.dispatch import Dispatch
from moemesh.runtime.experts import ExpertBank

# Experts with < min_tokens routed tokens: gate/up use their layer's all-token Hessian, down round-to-nearest.
FALLBACK = "layer-wide gate/up Hessian, round-to-nearest down"
DEFAULT_CALIB = Path(__file__).with_name("data") / "calib_en.txt"


class Hessians:
    """name -> [K, K] float32 sum of x x^T, name -> [K] sum of |x| (AWQ's activation scale), name -> token count."""

    def __init__(self) -> None:
        self.h: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def abs_mean(self, name: str) -> torch.Tensor:
        """[K] mean |x| per input channel over the tokens recorded for `name`."""
        return self.abs_sum[name] / max(self.tokens[name], 1)

    def add(self, names: list[str], x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
        if x.shape[0] == 0:
            return
        xtx, absx = x.T @ x, x.abs().sum(0)
        for name in names:  # q/k/v (gate/up) share one input: one product
            self.h[name] = self.h[name] + xtx if name in self.h else xtx.clone()
            self.abs_sum[name] = self.abs_sum[name] + absx if name in self.abs_sum else absx.clone()
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]


def _hook(hessians: Hessians, names: list[str]):
    return lambda _module, args: hessians.add(names, args[0])


def attach_dense(backbone, hessians: Hessians, expert_names: dict) -> list:
    """Pre-forward hooks on the backbone's Linears (first of each input-sharing bundle records for all)."""
    handles = []
    for i, layer in enumerate(backbone.layers):
        a, p = layer.attn, f"model.layers.{i}.self_attn"
        handles.append(a.q_proj.register_forward_pre_hook(
            _hook(hessians, [f"{p}.{x}_proj.weight" for x in "qkv"])))
        handles.append(a.o_proj.register_forward_pre_hook(_hook(hessians, [f"{p}.o_proj.weight"])))
        mlp = layer.mlp.shared if isinstance(layer.mlp, MoeBlock) else layer.mlp
        if mlp is None:
            continue
        prefix = expert_names.get(("shared", i), f"model.layers.{i}.mlp")
        handles.append(mlp.gate_proj.register_forward_pre_hook(
            _hook(hessians, [f"{prefix}.{x}_proj.weight" for x in ("gate", "up")])))
        handles.append(mlp.down_proj.register_forward_pre_hook(_hook(hessians, [f"{prefix}.down_proj.weight"])))
    return handles


class CalibrationDispatch(Dispatch):
    """Runs the float experts in process and records, per expert, the Hessians of its routed tokens.

    names(layer, e) -> (gate_up names, down name) in the checkpoint."""

    def __init__(self, bank: ExpertBank, hessians: Hessians, names) -> None:
        self.bank, self.hessians, self.names = bank, hessians, names
        self.layer_h = Hessians()  # all tokens of each MoE layer (the fallback)
        self.routed: dict[tuple[int, int], int] = {}

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        self.layer_h.add([f"{layer}"], hidden)
        gate_up = self.bank.gate_up[layer]  # [E_local, 2I, H]
        for row, e in enumerate(self.bank.experts):
            tokens = (topk_ids == e).any(-1).nonzero().squeeze(1)  # [n] tokens routed to e
            x = hidden[tokens].float()  # [n, H]
            g, u = (x @ gate_up[row].T.float()).chunk(2, dim=-1)
            gu_names, down_name = self.names(layer, e)
            self.hessians.add(gu_names, x)
            self.hessians.add([down_name], self.bank.act(g) * u)  # [n, I]
            self.routed[(layer, e)] = self.routed.get((layer, e), 0) + len(tokens)
        return self.bank.forward(layer, hidden, topk_ids, topk_weights)

    def export_layer_stats(self, key: str) -> None:
        """Copies each MoE layer's all-token input statistics into self.hessians under key.format(layer)."""
        for layer in list(self.layer_h.tokens):
            name = key.format(layer)
            self.hessians.h[name], self.hessians.abs_sum[name] = self.layer_h.h[layer], self.layer_h.abs_sum[layer]
            self.hessians.tokens[name] = self.layer_h.tokens[layer]

    def apply_fallback(self, min_tokens: int) -> list[tuple[int, int]]:
        """Experts with < min_tokens routed tokens: gate/up Hessian := the layer's all-token Hessian, down's :=
        a scaled identity (GPTQ then reduces to round-to-nearest there). Returns the (layer, expert) pairs."""
        fell = []
        for (layer, e), n in sorted(self.routed.items()):
            if n >= min_tokens:
                continue
            gu_names, down_name = self.names(layer, e)
            for name in gu_names:
                self.hessians.h[name] = self.layer_h.h[f"{layer}"].clone()
            self.hessians.h[down_name] = self._down_all_tokens(layer, e)
            for name in (*gu_names, down_name):  # counts as the layer's tokens (quantizer: tokens_per_input)
                self.hessians.tokens[name] = self.layer_h.tokens[f"{layer}"]
            fell.append((layer, e))
        return fell

    def _down_all_tokens(self, layer: int, e: int) -> torch.Tensor:
        """The down input's Hessian cannot be derived from the layer's (SwiGLU is nonlinear): identity * scale."""
        h = self.layer_h.h[f"{layer}"]
        inter = self.bank.down[layer].shape[2]
        return torch.eye(inter) * torch.diag(h).mean()
