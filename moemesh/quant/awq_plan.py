"""Where AWQ's scales go in a checkpoint: per decoder layer the groups of Linears sharing an input, the op whose
output is that input (1/s is folded there), and the resulting per-tensor row/column multipliers.

Groups of layer i (checkpoint names; `mlp` is also Mixtral's `block_sparse_moe`, w1/w3/w2 its gate/up/down):
- q/k/v_proj after input_layernorm (norm weight * 1/s);
- o_proj after v_proj (v rows and bias * 1/s). With grouped-query attention a v channel feeds nh/nkv query heads,
  so o's input channels share the scale of their v channel (`expand`). Attention without q/k/v_proj (MLA) and
  o_proj there: no scale (clip search only);
- gate/up of the dense FFN, of the shared expert(s) and of every routed expert after post_attention_layernorm: one s
  for all (they share the norm), searched on the sum of their output errors, each expert on its routed tokens; the
  router gate and shared_expert_gate read the same input and stay float, their columns * s (exact);
- each FFN's down_proj after its own up_proj (up rows * 1/s; SwiGLU act(g) * u is linear in u).
FEW-TOKEN RULE (FALLBACK below): a routed expert with fewer than min_tokens routed calibration tokens keeps s = 1 on
its down_proj (its own activations are too few to rank channels) and enters the shared gate/up search with its
layer's all-token Hessian (calibration.py); clip search still runs on that Hessian.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moemesh.quant.awq import Consumer, search_scale, weight_means
from moemesh.quant.calibration import Hessians

FALLBACK = "experts with < min_tokens routed tokens: down_proj s = 1, gate/up searched on the layer-wide Hessian"
GATE_UP, DOWN = ("gate_proj", "up_proj", "w1", "w3"), ("down_proj", "w2")
FLOAT_READERS = ("gate", "shared_expert_gate")  # router / shared-expert gate: float, read the MLP input
NO_CLIP = ("q_proj", "k_proj")


@dataclass
class ScaleGroup:
    consumers: list[str]  # quantized weights [N, K'] reading the group's input
    prev: list[str]  # tensors producing the input (norm weight [K], Linear rows [K, *], bias [K]): * 1/s on dim 0
    stats: str  # Hessians key whose abs_mean is the input's mean |x| [K]
    also: list[str] = field(default_factory=list)  # float tensors reading the same input: columns * s
    expand: torch.Tensor | None = None  # [K'] long: consumer input channel -> scale index


@dataclass
class Plan:
    """name -> multiplier of dim 0 (rows, or a 1-D tensor), name -> multiplier of the last dim (columns)."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, str] = field(default_factory=dict)  # group's first consumer -> chosen scales, "x^0.35"

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t with its multipliers applied in float32, back in t's dtype (one rounding for bf16 checkpoints)."""
        if name not in self.rows and name not in self.cols:
            return t
        out = t.float()
        if name in self.rows:
            out = out * self.rows[name].view(-1, *([1] * (t.dim() - 1)))
        if name in self.cols:
            out = out * self.cols[name]
        return out.to(t.dtype)

    def _mul(self, table: dict, name: str, v: torch.Tensor) -> None:
        table[name] = table[name] * v if name in table else v.clone()


def layer_groups(names: set[str], i: int, config: dict, moe_stats: str | None, fell: set[str]) -> list[ScaleGroup]:
    """The scale groups of decoder layer i. moe_stats: the Hessians key of the MoE layer's all-token input (None for
    a dense FFN); fell: FFN prefixes (experts) under the few-token rule."""
    groups, attn, base = [], f"model.layers.{i}.self_attn", f"model.layers.{i}"
    qkv = [f"{attn}.{x}_proj.weight" for x in "qkv"]
    if all(n in names for n in qkv) and f"{base}.input_layernorm.weight" in names:  # else: no scale (clip only)
        groups.append(ScaleGroup(qkv, [f"{base}.input_layernorm.weight"], qkv[0]))
        o = _o_group(names, attn, config)
        groups += [o] if o else []
    mlp = next((f"{base}.{m}" for m in ("mlp", "block_sparse_moe") if any(n.startswith(f"{base}.{m}.") for n in names)),
               None)
    if mlp is None or f"{base}.post_attention_layernorm.weight" not in names:
        return groups
    ffns, also = set(), []
    for n in sorted(x for x in names if x.startswith(mlp + ".") and x.endswith(".weight")):
        owner, leaf = n.removesuffix(".weight").rsplit(".", 1)
        if leaf in GATE_UP or leaf in DOWN:
            ffns.add(owner)
        elif owner == mlp and leaf in FLOAT_READERS:
            also.append(n)
        else:
            raise ValueError(f"--method awq: tensor {n!r} reads the FFN input but is not a per-expert gate/up/down "
                             f"Linear or a router (fused expert stacks are not supported; use --method rtn)")
    gate_up = sorted(n for f in ffns for leaf in GATE_UP if (n := f"{f}.{leaf}.weight") in names)
    groups.append(ScaleGroup(gate_up, [f"{base}.post_attention_layernorm.weight"], moe_stats or gate_up[0], also))
    for f in sorted(ffns - fell):
        down = next(n for leaf in DOWN if (n := f"{f}.{leaf}.weight") in names)
        up = next(n for leaf in ("up_proj", "w3") if (n := f"{f}.{leaf}.weight") in names)
        bias = up.removesuffix(".weight") + ".bias"
        groups.append(ScaleGroup([down], [up] + ([bias] if bias in names else []), down))
    return groups


def _o_group(names: set[str], attn: str, config: dict) -> ScaleGroup | None:
    o, v = f"{attn}.o_proj.weight", f"{attn}.v_proj.weight"
    heads = int(config.get("num_attention_heads", 0))
    kv = int(config.get("num_key_value_heads") or heads)
    if o not in names or not heads or heads % kv:
        return None
    hd = int(config.get("head_dim") or config["hidden_size"] // heads)
    c = torch.arange(heads * hd)  # o's input channel -> (query head, dim) -> the v channel feeding it
    expand = (c // hd) // (heads // kv) * hd + c % hd
    bias = f"{attn}.v_proj.bias"
    return ScaleGroup([o], [v] + ([bias] if bias in names else []), o, expand=expand)


def build_plan(groups: list[ScaleGroup], read: Callable[[str], torch.Tensor], hessians: Hessians,
               bits: Callable[[str], int], group: Callable[[str], int], symmetric: bool, duo: bool = False) -> Plan:
    """Searches each group's s (quant/awq.py; duo: also the weight-aware candidates) on the original float weights
    and calibration Hessians; records consumer columns * s and producer rows * 1/s."""
    plan = Plan()
    for g in groups:
        consumers = [Consumer(read(n).float(), hessians.h[n], bits(n)) for n in g.consumers]
        sizes = {group(n) for n in g.consumers}
        if len(sizes) != 1:
            raise ValueError(f"--method awq: Linears {g.consumers} share an input but got group sizes {sorted(sizes)}")
        size = sizes.pop()
        w_mean = _tied_mean(weight_means([c.weight for c in consumers], size), g.expand) if duo else None
        s, (alpha, is_duo), _ = search_scale(consumers, _tied_mean(hessians.abs_mean(g.stats), g.expand), size,
                                             symmetric, g.expand, w_mean)
        s_in = s[g.expand] if g.expand is not None else s
        for n in g.consumers + g.also:
            plan._mul(plan.cols, n, s_in)
        for n in g.prev:
            plan._mul(plan.rows, n, 1.0 / s)
        plan.alphas[g.consumers[0].removesuffix(".weight")] = f"x^{alpha:g}" + (f" / w^{1 - alpha:g}" if is_duo else "")
    return plan


def _tied_mean(abs_mean: torch.Tensor, expand: torch.Tensor | None) -> torch.Tensor:
    """[K'] per consumer input -> [K] per scale: the mean over the channels that share a scale (GQA's o_proj)."""
    if expand is None:
        return abs_mean
    k = int(expand.max()) + 1
    total = torch.zeros(k).index_add_(0, expand, abs_mean.float())
    return total / torch.bincount(expand, minlength=k).clamp(min=1)


def clip_allowed(name: str) -> bool:
    return re.search(r"\.(%s)\.weight$" % "|".join(NO_CLIP), name) is None


def plan_checkpoint(read: Callable[[str], torch.Tensor], names: set[str], config: dict, hessians: Hessians,
                    fell: set[str], bits: Callable[[str], int], group: Callable[[str], int], symmetric: bool,
                    progress: Callable | None = None, duo: bool = False) -> Plan:
    """Every decoder layer's groups (layer_groups) searched into one Plan. MoE layers' all-token input statistics
    are under Hessians key `model.layers.<i>.moe_input` (quantizer.collect_hessians)."""
    plan = Plan()
    layers = range(int(config["num_hidden_layers"]))
    for i in progress(layers) if progress else layers:
        moe = f"model.layers.{i}.moe_input"
        groups = layer_groups(names, i, config, moe if moe in hessians.abs_sum else None, fell)
        part = build_plan(groups, read, hessians, bits, group, symmetric, duo)
        for n, v in part.rows.items():
            plan._mul(plan.rows, n, v)
        for n, v in part.cols.items():
            plan._mul(plan.cols, n, v)
        plan.alphas.update(part.alphas)
    return plan
