"""Calibration: every FFN's input and neuron activations on the self-generated tokens, recorded while generating.

From these, `build_student` partitions each FFN (partition.py) and fits its router (router_fit.py). Memory: per
layer x [T, H] float32 and silu(gate) * up [T, F] bfloat16 (4096 tokens of SmolLM2: 30 x 4096 x (576*4 + 1536*2)
bytes = 660 MB).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moemesh.convert.checkpoint import DenseCheckpoint, LayerPartition, build_moe
from moemesh.convert.model import TrainableLlama
from moemesh.convert.partition import partition_layer
from moemesh.convert.router_fit import expert_scores, fit_router
from moemesh.convert.selfgen import self_generated
from moemesh.convert.settings import ConvertSettings

@dataclass
class Calibration:
    tokens: torch.Tensor  # [N, L] int64
    inputs: list[torch.Tensor] = field(default_factory=list)  # per layer FFN input [T, H] float32, CPU
    activations: list[torch.Tensor] = field(default_factory=list)  # per layer silu(gate)*up [T, F] bfloat16, CPU


@torch.no_grad()
def calibrate(teacher: TrainableLlama, dense: DenseCheckpoint, settings: ConvertSettings,
              log: Callable[[str], None]) -> Calibration:
    """Generate the calibration text, recording each FFN's input and activations as the tokens go through."""
    layers = dense.shape.num_layers
    inputs: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    acts: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def record(layer: int, x: torch.Tensor, act: torch.Tensor) -> None:
        inputs[layer].append(x.float().cpu())
        acts[layer].append(act.to("cpu", torch.bfloat16))  # bf16: no overflow on outlier neurons

    count = math.ceil(settings.calib_tokens / settings.seq_len)
    tokens = self_generated(teacher, dense.path, count, settings.seq_len, settings.seed, log, record)
    calib = Calibration(tokens=tokens.cpu(), inputs=[torch.cat(x) for x in inputs],
                        activations=[torch.cat(a) for a in acts])
    log(f"recorded FFN activations of {calib.inputs[0].shape[0]} calibration tokens in {layers} layers")
    return calib


def build_student(dense: DenseCheckpoint, calib: Calibration, settings: ConvertSettings, log: Callable[[str], None],
                  device: str | torch.device = "cpu", memo: dict | None = None) -> tuple[TrainableLlama, list[float]]:
    """The MoE model (on the CPU) before distillation and each layer's held-out router hit rate; the clustering
    and router fitting run on `device`. `memo` (a dict kept by the caller) reuses partitions across top-k values."""
    gen = torch.Generator().manual_seed(settings.seed)
    key = (settings.cluster, settings.experts, settings.shared_neurons, settings.seed)
    known = (memo or {}).get(key)
    partitions: list[LayerPartition] = []
    routers, hits = [], []
    for i in range(dense.shape.num_layers):
        gate, up, down = (dense.tensors[f"model.layers.{i}.mlp.{n}_proj.weight"].to(device, torch.float32)
                          for n in ("gate", "up", "down"))
        act = calib.activations[i].to(device, torch.float32)
        part = known[i] if known else partition_layer(settings.cluster, settings.experts, settings.shared_neurons,
                                                      act, gate, up, down, gen)
        fit = fit_router(calib.inputs[i].to(device), expert_scores(act, down, part), settings.top_k,
                         settings.router_steps, settings.seed + i)
        partitions.append(part)
        routers.append(fit.weight)
        hits.append(round(fit.hit_rate, 4))
        log(f"layer {i + 1}/{dense.shape.num_layers}: {settings.cluster} partition, router hit rate {fit.hit_rate:.3f}")
    if memo is not None:
        memo[key] = partitions
    return build_moe(dense, partitions, routers, settings), hits
