"""The packed backend's layers (`--backend packed`, the CPU): every projection, the LM head and the routed experts
on torch's packed int8 / int4 kernels (packed.py).

    Backbone: q/k/v (fused: one call), o, dense FFN and shared-expert projections -> PackedLinear (int8 per row,
              from the float weights, or their exact int4 codes where they lie on a 4-bit grid: packed.grid_codes;
              a dense QuantLinear's as they dequantize); the LM head (tied embeddings too) -> int8 (the embedding
              lookup keeps the float table). Router gates stay float (tiny, and they pick experts).
    Experts:  a checkpoint's int4 codes are kept as they are (its other integer weights, and float, int8 or fp8
              stacks, become int8 per row; `--quantization int4` rounds float experts to int4 first). Two forms:
              dense [2 E I, H] (gates, then ups) and [H, E I]: a step where every token selects every hosted expert
                  (the built-in smollm2-moe, top-8 of 8): two matmuls for the layer (ExpertBank._all_selected)
              per expert [2I, H] and [H, I]: sparse routing (ExpertBank._per_expert)
Only the form the model's routing takes is made, at load: dense when top_k >= num_experts (every token then selects
every hosted expert), else per expert (ExpertBank.forward then never takes the all-selected path). The bank's float
stacks are freed after packing (smollm2-moe's experts: 318 MB of float32 against 80 MB packed).
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.runtime.packed import Codes, PackedWeight, codes_of, concat, matmul, pack
from moemesh.runtime.quant import QuantLinear, QuantTensor

Part = Codes | torch.Tensor  # an int4 expert matrix as codes, anything else as float32


class PackedLinear(nn.Module):
    """y = x W^T (+ b) through a packed weight (float when the kernels cannot take the shape)."""

    def __init__(self, weight: PackedWeight | torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


def pack_backbone(backbone: nn.Module) -> int:
    """Swaps the backbone's projections for PackedLinear and packs its LM head (`backbone.packed_head`); returns
    how many weights were packed."""
    from moemesh.runtime.attention import Attention
    from moemesh.runtime.backbone import MoeBlock
    from moemesh.runtime.layers import Linear

    count = 0
    for layer in backbone.layers:
        if isinstance(layer.attn, Attention):
            count += _fuse_qkv(layer.attn)
        skip = {id(layer.mlp.gate), id(layer.mlp.shared_gate)} if isinstance(layer.mlp, MoeBlock) else set()
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, (Linear, QuantLinear)) and id(child) not in skip:
                    w = child.weight.data if isinstance(child, Linear) else _quant(child)
                    packed = pack(w)
                    float_w = w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)
                    setattr(parent, name, PackedLinear(packed if packed is not None else float_w, child.bias))
                    count += packed is not None
    head = pack(backbone.lm_head.data)
    backbone.packed_head = head
    return count + (head is not None)


def packed_weights(backbone: nn.Module, dispatch) -> list[PackedWeight | torch.Tensor]:
    """Every weight the packed backend made: the backbone's projections and LM head, and the routed experts of an
    in-process bank (dispatch.bank; none for remote shards)."""
    weights = [m.weight for m in backbone.modules() if isinstance(m, PackedLinear)]
    weights.append(getattr(backbone, "packed_head", None))
    experts = getattr(getattr(dispatch, "bank", None), "packed", None)
    return weights + (experts.weights() if isinstance(experts, PackedExperts) else [])


def _fuse_qkv(attn) -> int:
    """One packed [q; k; v] weight for the attention (one call a layer instead of three); 1 when made."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if len({p.bias is None for p in projections}) > 1 or not all(hasattr(p, "weight") for p in projections):
        return 0
    packed = pack(torch.cat([p.weight.data for p in projections]))
    if packed is None:
        return 0
    bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
    attn.fused_qkv = PackedLinear(packed, bias)
    attn.q_proj = attn.k_proj = attn.v_proj = None  # their float weights freed; forward takes fused_qkv
    return 1


def _quant(linear: QuantLinear) -> QuantTensor:
    return QuantTensor(linear.q, linear.scale, linear.block_k, linear.cols, linear.zero)


class PackedExperts:
    """An ExpertBank's layers in packed form (see the module doc)."""

    def __init__(self, bank, stored: dict | None = None, prefixes: dict[int, str] | None = None) -> None:
        """stored: the checkpoint's integer weights by tensor name (Checkpoint.quantized, QWeights), used in place of
        the bank's dequantized copies; prefixes: layer -> the checkpoint's MoE module prefix."""
        self.bank, self.stored, self.prefixes = bank, stored or {}, prefixes or {}
        self._dense: dict[int, tuple[PackedWeight | torch.Tensor, ...]] = {}
        self._each: dict[int, list[tuple[PackedWeight | torch.Tensor, ...]]] = {}
        moe = bank.spec.moe
        self.all_selected = moe.top_k >= moe.num_experts  # the dense form, else the per-expert one
        for layer in bank.layers:
            self.dense(layer) if self.all_selected else self.each(layer)
            bank.gate_up[layer] = bank.down[layer] = None  # the float / QuantTensor stacks: packed now
        self.nbytes = sum(w.nbytes if isinstance(w, PackedWeight) else w.numel() * w.element_size()
                          for w in self.weights())

    def weights(self) -> list[PackedWeight | torch.Tensor]:
        return [w for pair in [*self._dense.values(), *(p for ps in self._each.values() for p in ps)] for w in pair]

    def dense(self, layer: int) -> tuple[PackedWeight | torch.Tensor, PackedWeight | torch.Tensor]:
        """(gate_up [2 E I, H]: every gate row, then every up row; down [H, E I]) of the hosted experts."""
        if layer not in self._dense:
            if not self.all_selected:
                raise RuntimeError("packed experts of a sparse model have no dense form (ExpertBank routes around it)")
            gate_up, down = self._parts(layer)
            half = [(g[: len(g) // 2], g[len(g) // 2:]) if isinstance(g, torch.Tensor) else _halves(g) for g in gate_up]
            rows = [h[0] for h in half] + [h[1] for h in half]
            self._dense[layer] = (_joined(rows, 0), _joined(down, 1))
        return self._dense[layer]

    def each(self, layer: int) -> list[tuple[PackedWeight | torch.Tensor, PackedWeight | torch.Tensor]]:
        """Per hosted expert (gate_up [2I, H], down [H, I])."""
        if layer not in self._each:
            gate_up, down = self._parts(layer)
            self._each[layer] = [(_packed(g), _packed(d)) for g, d in zip(gate_up, down)]
        return self._each[layer]

    def _parts(self, layer: int) -> tuple[list[Part], list[Part]]:
        """Per hosted expert: gate_up [2I, H] and down [H, I], as codes where int4 codes exist."""
        from moemesh.runtime.experts import PER_EXPERT_NAMES  # experts.py imports this module

        gate_up, down = [], []
        for row, e in enumerate(self.bank.experts):
            g, u, d = (self._stored(layer, e, names) for names in zip(*PER_EXPERT_NAMES))  # by role: gate, up, down
            gate_up.append(concat([g, u], 0) if g is not None and u is not None else None)
            down.append(d)
            gate_up[-1] = gate_up[-1] or _part(self.bank.gate_up[layer], row)
            down[-1] = down[-1] or _part(self.bank.down[layer], row)
        return gate_up, down

    def _stored(self, layer: int, e: int, names: tuple[str, ...]) -> Codes | None:
        """The checkpoint's int4 codes of one expert matrix (any of its naming schemes), or None."""
        prefix = self.prefixes.get(layer)
        for name in names:
            qw = self.stored.get(f"{prefix}.experts.{e}.{name}.weight")
            if qw is not None and qw.bits == 4:
                zero = qw.zero.float() if qw.zero_f is None else qw.zero_f.float()
                return Codes(qw.q, qw.scale.float(), zero, 4, qw.group)
        return None


def _part(stack: QuantTensor | torch.Tensor, row: int) -> Part:
    if isinstance(stack, QuantTensor):
        return codes_of(stack[row]) if stack.scheme == "int4" else stack[row].dequantize(torch.float32)
    return stack[row].float()


def _halves(c: Codes) -> tuple[Codes, Codes]:
    n = c.codes.shape[0] // 2
    return tuple(Codes(c.codes[s], c.scale[s], c.zero[s], c.bits, c.group)  # type: ignore[return-value]
                 for s in (slice(0, n), slice(n, None)))


def _joined(parts: list[Part], dim: int) -> PackedWeight | torch.Tensor:
    if all(isinstance(p, Codes) for p in parts):
        joined = concat(parts, dim)  # type: ignore[arg-type]
        if joined is not None:
            return _packed(joined)
    return _packed(torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts], dim))


def _packed(w: Part) -> PackedWeight | torch.Tensor:
    packed = pack(w)
    return packed if packed is not None else (w if isinstance(w, torch.Tensor) else w.dequantize())
