"""ExpertShard: one shard's loaded experts plus the checks every Forward input passes before touching them.

A Forward block is [T, H] hidden states in the compute dtype, [T, K] int32 global expert ids (-1: unused slot) and
[T, K] float32 weights. Slots of experts this shard does not host are ignored by the bank (its global -> local map),
so the contract "selected experts hosted elsewhere contribute nothing" holds whatever the caller sends.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch

from moemesh.errors import ErrorStatus


class InvalidTensor(ValueError):
    """A Forward input has the wrong shape or dtype; the message starts with the field name (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class LayerNotHosted(RuntimeError):
    """Forward for a layer this shard does not host: the router's placement is stale or wrong."""

    status = ErrorStatus.FAILED_PRECONDITION


class Bank(Protocol):
    """What ExpertShard needs of moemesh.runtime.experts.ExpertBank: forward sums only the hosted selected experts
    (the slots of others contribute nothing); ExpertBank's also takes out= (its result written there)."""

    layers: tuple[int, ...]
    experts: tuple[int, ...]
    weight_bytes: int

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor: ...


def _ranges(ids: tuple[int, ...]) -> str:
    if not ids:
        return "none"
    return f"{min(ids)}-{max(ids)}" if list(ids) == list(range(min(ids), max(ids) + 1)) else ", ".join(map(str, ids))


@dataclass
class ExpertShard:
    """The bank and the model sizes needed to validate inputs."""

    bank: Bank
    hidden_size: int
    num_experts: int
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        self._layers = frozenset(self.bank.layers)
        # ExpertBank.forward writes into a given output (no copy); other banks (ONNX Runtime) return a tensor.
        self._writes_out = "out" in inspect.signature(self.bank.forward).parameters

    def check(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Raises LayerNotHosted or InvalidTensor (naming the field) for inputs the bank cannot run."""
        if layer not in self._layers:
            raise LayerNotHosted(
                f"layer {layer} is not hosted by this shard (it hosts layers {_ranges(tuple(sorted(self._layers)))})"
            )
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise InvalidTensor("hidden", f"shape {list(hidden.shape)} is not [T, {self.hidden_size}]")
        if hidden.dtype != self.dtype:
            raise InvalidTensor("hidden", f"dtype {hidden.dtype} is not the shard's compute dtype {self.dtype}")
        tokens = hidden.shape[0]
        if expert_ids.dim() != 2 or expert_ids.shape[0] != tokens:
            raise InvalidTensor("expert_ids", f"shape {list(expert_ids.shape)} is not [T={tokens}, K]")
        if expert_ids.dtype != torch.int32:
            raise InvalidTensor("expert_ids", f"dtype {expert_ids.dtype} is not int32")
        if weights.shape != expert_ids.shape:
            raise InvalidTensor("weights", f"shape {list(weights.shape)} does not match expert_ids "
                                           f"{list(expert_ids.shape)}")
        if weights.dtype != torch.float32:
            raise InvalidTensor("weights", f"dtype {weights.dtype} is not float32")
        if expert_ids.numel():
            low, high = (int(v) for v in expert_ids.aminmax())  # one pass: this runs per layer
            if low < -1 or high >= self.num_experts:
                raise InvalidTensor("expert_ids", f"values must lie in [-1, {self.num_experts - 1}], got "
                                                  f"[{low}, {high}]")

    def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H] routing-weighted sum of the hosted selected experts (same dtype as hidden); checks first. The
        bank ignores the slots of experts hosted elsewhere (its own global -> local map). With `out` ([T, H],
        hidden's dtype, e.g. the shared-memory output rows) the result is written there and `out` returned."""
        self.check(layer, hidden, expert_ids, weights)
        if hidden.shape[0] == 0:
            return hidden.clone() if out is None else out
        if out is not None and self._writes_out:
            return self.bank.forward(layer, hidden, expert_ids, weights, out=out)
        result = self.bank.forward(layer, hidden.to(self.device), expert_ids.to(self.device),
                                   weights.to(self.device)).to(hidden.dtype)
        return result if out is None else out.copy_(result)
