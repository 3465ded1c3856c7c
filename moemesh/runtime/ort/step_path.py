"""When OrtBackbone runs a step as one ORT call (step_graph.py) and what it does around that call.

    first eligible step: dispatch local (every expert in this process, on ONNX Runtime) or a dense model
                         -> StepGraph built from the weights the per-layer graphs run (a second copy in ORT's
                            memory; the kept QWeights are then freed); else the path is off for good
    every step:  one token per sequence, a cache with a past (kv_len >= 2), float32 pools
                 -> idx [T, P] past slots, mask [T, 1, 1, P + 1] -> StepGraph.run -> logits
                 -> the new K/V written into the pools (one index_copy_ per pool), expert counters += T
MOEMESH_ORT_STEP_GRAPH=0 keeps the per-layer path.
"""

from __future__ import annotations

import logging
import os

import torch

from moemesh.runtime.ort.step_graph import StepGraph, unsupported

ENABLED = os.environ.get("MOEMESH_ORT_STEP_GRAPH", "1") != "0"
log = logging.getLogger(__name__)


class StepPath:
    def __init__(self, backbone, picked: dict, device: str) -> None:
        self.backbone, self.picked, self.device = backbone, picked, device
        self.graph: StepGraph | None = None
        self.off = "" if ENABLED else "MOEMESH_ORT_STEP_GRAPH=0"

    def run(self, x: torch.Tensor, rope, ctx, dispatch, pools) -> torch.Tensor | None:
        """logits [T, V] of this step from one ORT call, or None where the per-layer path must run it."""
        if self.off or not _decode(ctx, pools):
            return None
        if self.graph is None and not self._build(dispatch):
            return None
        t, past = x.shape[0], ctx.kv_len - 1
        cos, sin = (r.reshape(t, -1).float() for r in rope)  # [T, D]
        idx = ctx.ctx_index[:, :past]  # [T, P]: one row per sequence (one token each)
        mask = torch.zeros(t, past + 1)
        mask[:, :past].masked_fill_(torch.arange(past)[None, :] >= ctx.cached[:, None], float("-inf"))
        logits, k_new, v_new = self.graph.run(x, cos, sin, idx, mask.view(t, 1, 1, past + 1), pools)
        for (k_pool, v_pool), k, v in zip(pools, k_new, v_new):  # [T, Hkv, D] each
            k_pool.index_copy_(0, ctx.slots, k)
            v_pool.index_copy_(0, ctx.slots, v)
        self._count(t)
        return logits

    def _build(self, dispatch) -> bool:
        """The step graph for this backbone and dispatch, or off (with why) when it cannot be built."""
        base = self.backbone.base
        banks = _local_banks(base, dispatch)
        why = unsupported(base, banks)
        if why:
            self.off = why
            log.info("onnxruntime: decode steps call ORT once per layer (%s)", why)
        else:
            self.graph = StepGraph(self.backbone, self.picked, banks, self.device)
            log.info("onnxruntime: a decode step is one ORT call (%d layers in one graph)", len(base.layers))
        getattr(getattr(dispatch, "bank", None), "release_weights", lambda: None)()
        self.picked = {}  # the per-layer graphs hold their own copies
        return self.graph is not None

    def _count(self, tokens: int) -> None:
        """Every hosted expert of every MoE layer took every token (the graph's routing): the routed-token counters."""
        for layer in self.backbone.base.layers:
            load = getattr(layer.mlp, "expert_load", None)
            if load is not None:
                load.counts[layer.mlp.layer] += tokens


def _decode(ctx, pools) -> bool:
    """One new token per sequence over a cached past, float32 pools on the CPU."""
    if pools is None or ctx.slots is None or ctx.q_len != 1 or ctx.kv_len < 2:
        return False
    k_pool, v_pool = pools[0]
    return (k_pool.dtype == torch.float32 and v_pool.dtype == torch.float32 and not k_pool.is_cuda
            and k_pool.is_contiguous() and v_pool.is_contiguous())


def _local_banks(base, dispatch) -> dict | None:
    """layer -> bank_nodes of an in-process ONNX Runtime bank hosting every expert of every MoE layer; {} for a
    dense model; None when the experts are elsewhere (shards) or not on ONNX Runtime."""
    moe = [layer.mlp.layer for layer in base.layers if hasattr(layer.mlp, "gate")]
    if not moe:
        return {}
    bank = getattr(dispatch, "bank", None)
    if bank is None or not hasattr(bank, "bank_nodes") or len(bank.experts) != base.spec.moe.num_experts:
        return None
    nodes = {layer: bank.bank_nodes(layer) for layer in moe}
    return nodes if all(n is not None for n in nodes.values()) else None
