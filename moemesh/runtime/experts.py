"""Routed experts of some MoE layers, in process: what an expert shard hosts, or all of them for a local model.

`ExpertBank.load` reads only the hosted experts' tensors: per-expert layouts (`<moe>.experts.{e}.gate_proj.weight`
/ `w1`...) tensor by tensor, fused layouts (`<moe>.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], as
transformers 5 holds them in memory) one expert slice at a time. Weights are stacked per layer as
gate_up [E_local, 2I, H] and down [E_local, H, I], or as quant.QuantTensor stacks of the same shapes
(`quantization` fp8/int8: one scale per output channel, int4: one per 128 columns; a DeepSeek block-scaled FP8
checkpoint stays in FP8 with its block scales). The fused GPU kernels dequantize in registers; the torch paths
dequantize a layer on the fly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moemesh.runtime.checkpoint import Checkpoint, resolve_model_dir
from moemesh.runtime.dummy import open_checkpoint
from moemesh.runtime.gpu import kernels_usable
from moemesh.runtime.layers import ACTIVATIONS
from moemesh.runtime.packed import matmul
from moemesh.runtime.packed_layers import PackedExperts
from moemesh.runtime.quant import (QuantTensor, check_quantization, concat_rows, from_block_fp8, int4_from_qweight,
                                   quantize, stack)
from moemesh.runtime.spec import ModelSpec, load_spec

GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
MOE_MODULES = ("mlp", "block_sparse_moe")  # transformers names; Mixtral checkpoints use block_sparse_moe
PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def shard_experts(num_experts: int, num_shards: int, index: int) -> tuple[int, ...]:
    """Contiguous, balanced split of expert ids 0..num_experts-1 (contiguous keeps DeepSeek's expert groups
    together); shard `index` of `num_shards`."""
    if num_shards < 1 or num_shards > num_experts:
        raise ValueError(f"num_shards must be in [1, {num_experts}] for {num_experts} experts, got {num_shards}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index must be in [0, {num_shards}), got {index}")
    return tuple(range(index * num_experts // num_shards, (index + 1) * num_experts // num_shards))


def moe_prefix(ckpt: Checkpoint, layer: int) -> str:
    """`model.layers.{layer}.mlp` or `.block_sparse_moe`, whichever holds the layer's router."""
    for module in MOE_MODULES:
        prefix = f"model.layers.{layer}.{module}"
        if f"{prefix}.gate.weight" in ckpt:
            return prefix
    raise KeyError(f"no router 'model.layers.{layer}.mlp.gate.weight' in checkpoint {str(ckpt.dir)!r}")


def _read_expert(ckpt: Checkpoint, prefix: str, e: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) of expert e, read from whichever layout the checkpoint uses."""
    for gate, up, down in PER_EXPERT_NAMES:
        base = f"{prefix}.experts.{e}"
        if f"{base}.{gate}.weight" in ckpt:
            g, u = (ckpt.read(f"{base}.{n}.weight", device, dtype) for n in (gate, up))
            return torch.cat((g, u), dim=0), ckpt.read(f"{base}.{down}.weight", device, dtype)
    for suffix in ("", ".weight"):
        fused = f"{prefix}.experts.gate_up_proj{suffix}"
        if fused in ckpt:
            return (ckpt.read_rows(fused, e, device, dtype),
                    ckpt.read_rows(f"{prefix}.experts.down_proj{suffix}", e, device, dtype))
    raise KeyError(f"expert {e} of {prefix!r} not found (neither per-expert nor fused gate_up_proj tensors)")


def _read_fp8_expert(ckpt: Checkpoint, prefix: str, e: int, device) -> tuple[QuantTensor, QuantTensor] | None:
    """(gate_up, down) of expert e as stored in a block-scaled FP8 checkpoint (weight + weight_scale_inv), without
    dequantizing; None when the checkpoint does not store this expert that way."""
    raw = getattr(ckpt, "read_fp8", None)
    for gate, up, down in PER_EXPERT_NAMES:
        base = f"{prefix}.experts.{e}"
        if raw is None or f"{base}.{gate}.weight_scale_inv" not in ckpt:
            continue
        g, u, d = (from_block_fp8(*raw(f"{base}.{n}.weight", device), ckpt.fp8_block) for n in (gate, up, down))
        return QuantTensor(torch.cat((g.q, u.q)), torch.cat((g.scale, u.scale)), g.block_k), d
    return None


def _read_int4_expert(ckpt: Checkpoint, prefix: str, e: int, device) -> tuple[QuantTensor, QuantTensor] | None:
    """(gate_up, down) of expert e with an int4 checkpoint's own codes, scales and zero points
    (quant.int4_from_qweight); None when not stored that way (not per-expert int4, a group size the kernels do not
    take): then re-quantized from the dequantized weights."""
    for names in PER_EXPERT_NAMES:
        full = [f"{prefix}.experts.{e}.{n}.weight" for n in names]
        if getattr(ckpt, "quant", None) is None or full[0] in ckpt.files or full[0] not in ckpt:
            continue
        try:
            for name in full:
                ckpt.read(name)  # keeps the QWeight in ckpt.quantized
            g, u, d = (int4_from_qweight(ckpt.quantized[name], name) for name in full)
            gate_up = concat_rows([g, u])
        except ValueError:
            return None
        return gate_up.to(device), d.to(device)
    return None


def _read_layer(ckpt: Checkpoint, prefix: str, experts: tuple[int, ...], device, dtype, quantization: str):
    """(gate_up, down) stacks of one layer's hosted experts: tensors, or QuantTensors when quantized."""
    reader = {"fp8": _read_fp8_expert, "int4": _read_int4_expert}.get(quantization)
    if reader is not None:  # served as stored when the checkpoint is in that format
        raw = [reader(ckpt, prefix, e, device) for e in experts]
        if all(r is not None for r in raw):
            return stack([r[0] for r in raw]), stack([r[1] for r in raw])
    pairs = [_read_expert(ckpt, prefix, e, device, dtype) for e in experts]
    gate_up, down = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    if quantization == "none":
        return gate_up, down
    return quantize(gate_up, quantization), quantize(down, quantization)  # the bf16 stacks are freed on return


class ExpertBank:
    """Hosted experts of the hosted layers. forward() sums, per token, the weighted outputs of those of its
    selected experts hosted here; others contribute nothing (another shard adds them)."""

    def __init__(self, spec: ModelSpec, experts: tuple[int, ...], gate_up: dict, down: dict,
                 dtype: torch.dtype | None = None) -> None:
        """gate_up/down: layer -> stacked tensors or QuantTensors; dtype: compute dtype (needed when quantized)."""
        self.spec = spec
        self.experts = experts
        self.layers = tuple(sorted(gate_up))
        self.gate_up = gate_up  # layer -> [E_local, 2I, H] (tensor or QuantTensor)
        self.down = down  # layer -> [E_local, H, I]
        self.act = ACTIVATIONS[spec.hidden_act]
        first = next(iter(gate_up.values()))
        self.quantization = first.scheme if isinstance(first, QuantTensor) else "none"
        self.dtype, self.device = dtype or first.dtype, first.q.device if self.quantization != "none" else first.device
        self.read_names: tuple[str, ...] = ()  # checkpoint tensors (or "name[e]" slices) load() read
        self.weight_bytes = sum(t.nbytes if isinstance(t, QuantTensor) else t.numel() * t.element_size()
                                for t in [*gate_up.values(), *down.values()])
        local = torch.full((spec.num_experts,), -1, dtype=torch.int64)
        local[list(experts)] = torch.arange(len(experts))
        self.local_index = local.to(self.device)  # global expert id -> row in the stacks, -1 if not hosted
        # column[id + 1]: 1 + the row of global expert id, 0 for an expert hosted elsewhere or the unused id -1. [E + 1]
        self._column = torch.cat((torch.zeros(1, dtype=torch.int64), local + 1)).to(self.device)
        self._concat: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # see _all_selected
        self.packed: PackedExperts | None = None  # backend packed (load): the layers on torch's packed kernels
        # '' when forward runs the fused Triton kernels (CUDA, bf16/fp16, SiLU), else why it keeps the torch path.
        self.fused_off = kernels_usable(self.device, self.dtype) or (
            "" if spec.hidden_act == "silu" else f"activation {spec.hidden_act} (the fused kernel is SiLU)") or (
            _fp8_unsupported(self.device) if self.quantization == "fp8" else "")

    @classmethod
    def load(cls, model_dir: str | Path, experts: tuple[int, ...] | list[int] | None = None,
             layers: list[int] | tuple[int, ...] | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, spec: ModelSpec | None = None,
             load_format: str = "auto", quantization: str = "none", packed: bool = False) -> ExpertBank:
        """experts: global ids to host (None: all); layers: MoE layers to host (None: every MoE layer);
        load_format "dummy": random weights from config.json alone (see dummy.py); quantization: none, fp8, int8,
        int4 (weight-only, see quant.py); packed: the CPU's packed int8 / int4 kernels (packed_layers.py)."""
        check_quantization(quantization)
        model_dir = resolve_model_dir(model_dir)
        spec = spec or load_spec(model_dir)
        if spec.moe is None:
            raise ValueError(f"{spec.architecture} in {str(model_dir)!r} has no routed experts")
        experts = tuple(sorted(set(range(spec.num_experts) if experts is None else experts)))
        layers = tuple(spec.moe_layers if layers is None else layers)
        bad = [e for e in experts if not 0 <= e < spec.num_experts] or [x for x in layers if x not in spec.moe_layers]
        if bad or not experts or not layers:
            raise ValueError(f"bad expert placement: experts {experts} of {spec.num_experts}, layers {layers} of "
                             f"MoE layers {spec.moe_layers} (offending: {bad})")
        with open_checkpoint(model_dir, spec, load_format) as ckpt:
            gate_up, down = {}, {}
            for layer in layers:
                prefix = moe_prefix(ckpt, layer)
                gate_up[layer], down[layer] = _read_layer(ckpt, prefix, experts, device, dtype, quantization)
            bank = cls(spec, experts, gate_up, down, dtype)
            bank.read_names = tuple(ckpt.reads)
            if packed:
                if bank.device.type != "cpu":
                    raise ValueError(f"backend packed runs torch's int8 / int4 CPU kernels, not on {device}")
                names = {layer: moe_prefix(ckpt, layer) for layer in layers}
                bank.packed = PackedExperts(bank, dict(getattr(ckpt, "quantized", {})), names)
                bank.weight_bytes = bank.packed.nbytes
        return bank

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, out: torch.Tensor | None = None,
                float32_ok: bool = False) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, K] global ids (-1 unused, int32 or int64), topk_weights [T, K] -> [T, H] in
        hidden's dtype and device; written into `out` ([T, H], hidden's dtype; e.g. a shared-memory output region)
        when given, which is then returned. float32_ok: the fused path may return its float32 sum as is (the caller
        adds it to the residual stream in float32: one conversion launch per layer less)."""
        if layer not in self.gate_up:
            raise KeyError(f"layer {layer} is not hosted here (hosted: {self.layers})")
        caller_device, caller_dtype = hidden.device, hidden.dtype
        hidden, topk_weights = hidden.to(self.device), topk_weights.to(self.device)
        if not self.fused_off:
            y = self._fused(layer, hidden, topk_ids, topk_weights)  # [T, H] float32
            if float32_ok and out is None and caller_device == self.device:
                return y
            return _into(y, out, caller_device, caller_dtype)
        # The torch reference path from here on (the CPU, or a GPU setting the fused kernel does not cover: see
        # fused_off). Its data-dependent shapes (count_nonzero, nonzero, bincount) synchronize the host once per
        # layer; the fused path above does not, and it is the one CUDA graphs capture.
        # One gather maps global ids to 1 + local row (0: not hosted here); on the CPU the per-op cost dominates a
        # decode step's expert call, so the dense path below is kept to a handful of ops.
        column = self._column[topk_ids.to(self.device, torch.int64) + 1]  # [T, K]
        selected = int(column.count_nonzero())
        every = selected == hidden.shape[0] * len(self.experts)  # every token selected every hosted expert
        # packed: only one form exists; the dense one also serves a token that selected fewer (weight 0 for the rest)
        if every if self.packed is None else self.packed.all_selected:
            y = self._all_selected(layer, hidden, column, topk_weights, out)
            return y if y is out else _into(y, out, caller_device, caller_dtype)
        result = torch.zeros(hidden.shape, dtype=torch.float32, device=self.device)  # accumulate in float32
        if selected:
            self._sparse(layer, hidden, column.reshape(-1) - 1, topk_weights, result)
        return _into(result, out, caller_device, caller_dtype)

    def _sparse(self, layer: int, hidden: torch.Tensor, local: torch.Tensor, topk_weights: torch.Tensor,
                result: torch.Tensor) -> None:
        """Adds the hosted selected experts' weighted outputs into result [T, H] float32; local [T*K] local rows
        (-1: elsewhere or unused)."""
        k = topk_weights.shape[1]
        hosted = (local >= 0).nonzero().squeeze(1)  # flat (token, slot) pairs for experts hosted here
        order = hosted[local[hosted].argsort(stable=True)]  # [P] pairs grouped by local expert
        counts = torch.bincount(local[order], minlength=len(self.experts))  # [E_local]
        tokens = order // k  # [P] token of each pair
        x = hidden[tokens].to(self.dtype)  # [P, H] one gather for all experts
        if self.packed is not None:
            y = self._per_expert(self.packed.each(layer), x, counts)  # [P, H]
        elif self._use_grouped_mm():
            y = self._grouped(*self._dense(layer), x, counts)
        else:
            y = self._per_expert(list(zip(*self._dense(layer))), x, counts)
        weights = topk_weights.reshape(-1)[order].float()  # [P]
        result.index_add_(0, tokens, y.float() * weights[:, None])

    def _all_selected(self, layer: int, hidden: torch.Tensor, column: torch.Tensor, topk_weights: torch.Tensor,
                      out: torch.Tensor | None) -> torch.Tensor:
        """Dense routing over this bank (e.g. the built-in `smollm2-moe`, top-8 of 8): the hosted experts side by
        side are one FFN of E_local * I neurons, so two GEMMs replace E_local pairs, no gather or scatter; each
        neuron is scaled by its expert's routing weight. column [T, K] 1 + local row (0: elsewhere or unused).
        Returns [T, H]: `out` when it has the compute dtype (the down GEMM writes it), else float32."""
        concat = self.packed.dense(layer) if self.packed is not None else self._concat.get(layer)
        if concat is None:  # cached only unquantized: it duplicates the layer's expert weights
            gate_up, down = self._dense(layer)
            e, two_i, h = gate_up.shape
            gate_up = gate_up.view(e, 2, two_i // 2, h).transpose(0, 1).reshape(-1, h)  # [2*E*I]: gates, then ups
            concat = (gate_up, down.permute(1, 0, 2).reshape(h, -1))  # [2*E*I, H], [H, E*I]
            if self.quantization == "none":
                self._concat[layer] = concat
        gate_up_w, down_w = concat
        t, experts = hidden.shape[0], len(self.experts)
        weights = torch.zeros(t, experts + 1, dtype=torch.float32, device=self.device)  # [T, 1 + E_local]
        weights.scatter_add_(1, column, topk_weights.float())  # column 0 collects the slots hosted elsewhere
        x = hidden.to(self.dtype)  # [T, H]
        gate, up = matmul(x, gate_up_w).chunk(2, dim=1)  # [T, E*I] each
        act = self.act(gate).mul_(up)
        act.view(t, experts, -1).mul_(weights[:, 1:, None].to(self.dtype))
        if out is not None and out.dtype == self.dtype and out.device == self.device:
            return torch.matmul(act, down_w.T, out=out) if self.packed is None else out.copy_(matmul(act, down_w))
        return matmul(act, down_w).float()  # [T, H]

    def _dense(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) in the compute dtype; quantized layers dequantized on the fly."""
        pair = self.gate_up[layer], self.down[layer]
        return tuple(w.dequantize(self.dtype) if isinstance(w, QuantTensor) else w for w in pair)

    def _fused(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> torch.Tensor:
        """GPU path (gpu/fused_moe.py): routing sorted on the device, two Triton GEMMs, no host sync. [T, H] fp32."""
        from moemesh.runtime.gpu.fused_moe import fused_moe  # imports triton: CUDA only

        ids = topk_ids.to(self.device)  # [T, K] global ids, -1 unused
        if len(self.experts) != self.spec.num_experts:  # a shard: global -> local rows, -1 where hosted elsewhere
            ids = torch.where(ids >= 0, self.local_index[ids.clamp(min=0)], -1)
        return fused_moe(hidden.to(self.dtype), self.gate_up[layer], self.down[layer], ids, topk_weights)

    def _use_grouped_mm(self) -> bool:
        return self.device.type == "cuda" and self.dtype == torch.bfloat16 and GROUPED_MM is not None

    def _per_expert(self, pairs: list, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One matmul pair per hosted expert that has tokens (x rows grouped by expert, counts [E_local]); pairs:
        per hosted expert (gate_up [2I, H], down [H, I]), tensors or packed weights."""
        y = torch.empty_like(x)
        start = 0
        for (w_gate_up, w_down), n in zip(pairs, counts.tolist()):
            if n:
                rows = slice(start, start + n)
                gate, up = matmul(x[rows], w_gate_up).chunk(2, dim=-1)  # [n, I] each
                y[rows] = matmul(self.act(gate) * up, w_down)  # [n, H]
                start += n
        return y

    def _grouped(self, w_gate_up: torch.Tensor, w_down: torch.Tensor, x: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """Same as _per_expert in two grouped GEMMs (CUDA bf16): no per-expert launches, no host sync."""
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E_local] end row of each expert
        gate_up = GROUPED_MM(x, w_gate_up.transpose(1, 2), offs=offsets)  # [P, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return GROUPED_MM((self.act(gate) * up).contiguous(), w_down.transpose(1, 2), offs=offsets)  # [P, H]

    __call__ = forward


def _into(y: torch.Tensor, out: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """y [T, H] in the caller's device and dtype: copied into `out` when given."""
    return y.to(device, dtype) if out is None else out.copy_(y)


def _fp8_unsupported(device: torch.device) -> str:
    """'' when the GPU converts e4m3 in hardware (compute capability 8.9+: Ada, Hopper), else why not."""
    major, minor = torch.cuda.get_device_capability(device)
    return "" if (major, minor) >= (8, 9) else f"fp8 weights need compute capability 8.9+, this GPU has {major}.{minor}"
