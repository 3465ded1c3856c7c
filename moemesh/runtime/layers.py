"""Small building blocks shared by the backbone and the expert bank: RMSNorm, Linear from checkpoint tensors, the
SwiGLU MLP, activations. Weights are frozen parameters (inference) but remain trainable if a caller wants to."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.runtime.checkpoint import Checkpoint

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class Loader:
    """Reads named tensors of one checkpoint onto a device/dtype (the dtype applies to floating tensors)."""

    def __init__(self, ckpt: Checkpoint, device: torch.device | str, dtype: torch.dtype) -> None:
        self.ckpt, self.device, self.dtype = ckpt, device, dtype

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.ckpt.read(name, self.device, dtype or self.dtype)

    def has(self, name: str) -> bool:
        return name in self.ckpt


class Linear(nn.Module):
    """y = x W^T (+ b); the bias is loaded when the checkpoint has `<prefix>.bias`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = _param(weight)  # [out, in]
        self.bias = _param(bias) if bias is not None else None

    @classmethod
    def load(cls, ld: Loader, prefix: str, dtype: torch.dtype | None = None) -> Linear:
        bias = ld.tensor(f"{prefix}.bias", dtype) if ld.has(f"{prefix}.bias") else None
        return cls(ld.tensor(f"{prefix}.weight", dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Normalised in float32, cast back, then scaled (the transformers order, for bit-close parity)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = _param(weight)
        self.eps = eps

    @classmethod
    def load(cls, ld: Loader, name: str, eps: float) -> RMSNorm:
        return cls(ld.tensor(f"{name}.weight"), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same bits without the two no-op casts (a CPU decode step runs ~60 norms)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense FFN, Qwen/DeepSeek shared experts, moemesh's shared expert."""

    def __init__(self, gate: Linear, up: Linear, down: Linear, act: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act = ACTIVATIONS[act]

    @classmethod
    def load(cls, ld: Loader, prefix: str, act: str) -> GatedMLP:
        return cls(*(Linear.load(ld, f"{prefix}.{p}_proj") for p in ("gate", "up", "down")), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
