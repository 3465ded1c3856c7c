"""In-process ExpertDispatch implementations (types.ExpertDispatch); the router's transports to expert shards live in
services/router/.

`Dispatch` is the base every transport derives from: `__call__` = collect(submit(...)), no-op step hooks. In process
`submit` runs the experts at once (on a GPU the kernels are only queued, so the host does not wait), `collect`
returns the result.
"""

from __future__ import annotations

import torch

from moemesh.runtime.experts import ExpertBank


class Dispatch:
    """Base of the ExpertDispatch implementations (see moemesh.runtime.types.ExpertDispatch)."""

    # True when submit/collect only queue device work on the caller's stream (no host round trip, no host sync), so
    # a decode step that calls them can be captured in a CUDA graph and replayed. Transports say so themselves.
    capturable = False
    # True when a step may be launched before the previous step's results reached the host (runtime/step_ahead.py):
    # the experts' work is queued in stream order and no step can fail after its launch.
    steps_ahead = False

    def begin_step(self, tokens: int) -> None:
        """Called once per step before the forward with T, the tokens every MoE layer of the step carries."""

    def end_step(self) -> None:
        """Called once per step after the forward (also after a failure)."""

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> object:
        raise NotImplementedError

    def collect(self, handle: object) -> torch.Tensor:
        return handle  # type: ignore[return-value]  # in process: the handle is the [T, H] output

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        return self.collect(self.submit(layer, hidden, topk_ids, topk_weights))


class LocalDispatch(Dispatch):
    """Runs the routed experts in process on one ExpertBank (which must host every expert and MoE layer)."""

    def __init__(self, bank: ExpertBank) -> None:
        self.bank = bank
        self.capturable = bank.device.type == "cuda"  # in process on the GPU: kernels only (see ExpertBank)
        self.steps_ahead = self.capturable
        self._kw = {"float32_ok": True} if isinstance(bank, ExpertBank) else {}  # not the ONNX Runtime bank

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> torch.Tensor:
        # float32 from the fused kernels: Backbone adds it to the residual (casting where it is not fused)
        return self.bank.forward(layer, hidden, topk_ids, topk_weights, **self._kw).to(hidden.device)


class SumDispatch(Dispatch):
    """Sums the partial outputs of several dispatches that each host part of the experts (shards in process)."""

    def __init__(self, parts: list) -> None:
        if not parts:
            raise ValueError("SumDispatch needs at least one part")
        self.parts = list(parts)
        self.capturable = all(getattr(p, "capturable", False) for p in self.parts)

    def begin_step(self, tokens: int) -> None:
        for part in self.parts:
            getattr(part, "begin_step", lambda _t: None)(tokens)

    def end_step(self) -> None:
        for part in self.parts:
            getattr(part, "end_step", lambda: None)()

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> tuple[torch.Tensor, list]:
        # Every part starts before any is collected, so remote parts run concurrently.
        handles = [(p, p.submit(layer, hidden, topk_ids, topk_weights) if hasattr(p, "submit")
                    else p(layer, hidden, topk_ids, topk_weights)) for p in self.parts]
        return hidden, handles

    def collect(self, handle: tuple[torch.Tensor, list]) -> torch.Tensor:
        hidden, handles = handle
        total = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for part, h in handles:
            out = part.collect(h) if hasattr(part, "collect") else h
            total += out.to(hidden.device, torch.float32)
        return total.to(hidden.dtype)


class DenseModel(Dispatch):
    """The dispatch of a model without routed experts: any call is a bug."""

    capturable = True  # never called

    def submit(self, layer: int, *args: object) -> object:
        raise RuntimeError(f"layer {layer} asked for routed experts but the model is dense")
