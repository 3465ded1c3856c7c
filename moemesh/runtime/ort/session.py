"""ONNX Runtime sessions for the ORT backend: one provider choice and one set of session options for the process.

CUDAExecutionProvider where onnxruntime-gpu provides it and the caller asked for a CUDA device, else the CPU provider.
Threads: ORT_THREADS (default: torch's intra-op thread count) per session; sessions run one at a time, so their
spinning pools would fight each other: spinning is off unless ORT_SPIN=1.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import torch


def providers(device: str = "cpu") -> list[str]:
    available = ort.get_available_providers()
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("ORT_THREADS", torch.get_num_threads()))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = os.environ.get("ORT_SPIN", "0")
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    return so


class Graph:
    """One InferenceSession over a built model; run(**inputs) takes and returns float32 torch tensors (CPU)."""

    def __init__(self, model, device: str = "cpu") -> None:
        self.session = ort.InferenceSession(model.SerializeToString(), options(), providers=providers(device))
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy()) for k, v in inputs.items()}
        return [torch.from_numpy(o) for o in self.session.run(self.outputs, feed)]
