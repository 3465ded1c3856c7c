"""AWQ (Lin et al. 2023, activation-aware weight quantization): the math, on calibration statistics.

A group of Linears that read the same input x [T, K] (q/k/v after input_layernorm; gate/up of the dense FFN or of
every expert after post_attention_layernorm; one down_proj after its up_proj) shares per-input-channel scales s [K]:
W x = (W diag(s)) (diag(1/s) x). 1/s is folded into the op that produces x (the RMSNorm weight, or the rows of the
preceding Linear: exact in float), and W diag(s) is rounded to nearest. Salient input channels (large mean |x|) get
s > 1, so their weights are rounded with a relatively finer step. s = mean|x|^alpha (normalised so that
max(s) * min(s) = 1), alpha searched on the grid ALPHAS to minimise the groups' output error on calibration inputs.

The output error needs only the input Hessian H = sum x x^T (quant/calibration.py), not the activations:
||X (W - Wq)^T||^2 = trace(D H D^T) with D = W - Wq [N, K]. After scaling, the input is x / s, so the Hessian seen
by W diag(s) is diag(1/s) H diag(1/s). alpha = 0 is s = 1, plain round-to-nearest: on the calibration inputs AWQ
is never worse than RTN by construction.

Clip search (the paper's second step): per (row, group) the quantization range shrinks by the ratio in CLIP_RATIOS
that minimises that group's output error, d_g H_gg d_g^T (H_gg: the group's diagonal block of H, as AutoAWQ
measures each group's output on its own input slice). Skipped for q/k (attention scores are sensitive to outliers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moemesh.quant.packing import QWeight, minmax_params, quantize_groups

ALPHAS = tuple(i / 20 for i in range(20))  # 0 (= RTN) .. 0.95, the paper's grid
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # 1.0 .. 0.55 of each group's range (AutoAWQ goes to 0.5)


@dataclass(frozen=True)
class Consumer:
    """One Linear of a scale group: weight [N, K'], its input Hessian [K', K'] (float inputs, before scaling), and
    bits. K' = K, or the expanded size when `expand` maps the K scales onto more input channels."""

    weight: torch.Tensor
    hessian: torch.Tensor
    bits: int


@contextmanager
def one_thread() -> Iterator[None]:
    """The searches are thousands of small matmuls: OpenMP workers waking for each made them ~100x slower on 2
    busy cores (13 ms for a [32, 64] @ [64, 64] product at load 11); one thread, as gptq.py does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace(D H D^T) = sum over calibration tokens of ||x D^T||^2; delta [N, K], hessian [K, K]."""
    return float(((delta @ hessian) * delta).sum())


def fake_quant(w: torch.Tensor, bits: int, group: int, symmetric: bool, shrink: float = 1.0) -> torch.Tensor:
    """Round-to-nearest w [N, K] (range shrunk by `shrink`, codes clamped to the grid) and dequantized."""
    scale, zero = minmax_params(w * shrink, bits, group, symmetric)
    return _dequantized(w, scale, zero, bits, group)


def scales_for(abs_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s [K] = mean|x|^alpha (or, "duo" as AutoAWQ/llmcompressor by default, mean|x|^alpha / mean|w|^(1-alpha)),
    normalised to max * min = 1 (only the relative scale matters to the error)."""
    s = abs_mean.float().clamp(min=1e-4) ** alpha
    if w_mean is not None:
        s = (s / (w_mean.float() ** (1 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_means(weights: list[torch.Tensor], group: int) -> torch.Tensor:
    """[K] mean over all rows of |w| / (its group's max |w|): the weight side of duo scaling."""
    total, rows = 0.0, 0
    for w in weights:
        n, k = w.shape
        a = w.float().abs().view(n, k // group, group)
        total = total + (a / (a.amax(-1, keepdim=True) + 1e-6)).view(n, k).sum(0)
        rows += n
    return total / rows


def search_scale(consumers: list[Consumer], abs_mean: torch.Tensor, group: int, symmetric: bool,
                 expand: torch.Tensor | None = None, w_mean: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, tuple[float, bool], dict[tuple[float, bool], float]]:
    """The best s [K] for the consumers' summed output error over ALPHAS, x-only and, when w_mean [K] is given,
    also duo. expand [K'] (long), when given, maps each consumer input channel to its scale (o_proj behind
    grouped-query attention: a v channel feeds several heads). Returns (s, (alpha, duo), (alpha, duo) -> error)."""
    errors: dict[tuple[float, bool], float] = {}
    best = (float("inf"), (0.0, False), torch.ones_like(abs_mean, dtype=torch.float32))
    for key in [(a, False) for a in ALPHAS] + ([(a, True) for a in ALPHAS] if w_mean is not None else []):
        s = scales_for(abs_mean, key[0], w_mean if key[1] else None)
        s_in = s[expand] if expand is not None else s  # [K']
        err = 0.0
        for c in consumers:
            w = c.weight.float()
            err += output_error(w - fake_quant(w * s_in, c.bits, group, symmetric) / s_in, c.hessian)
        errors[key] = err
        if err < best[0]:
            best = (err, key, s)
    return best[2], best[1], errors


def scaled_hessian(hessian: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The Hessian of x / col (the input of W diag(col)): H / (col col^T)."""
    inv = 1.0 / col.float()
    return hessian * inv[:, None] * inv[None, :]


def clip_quantize(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, group: int,
                  symmetric: bool) -> QWeight:
    """w [N, K] -> QWeight whose per-(row, group) range is the ratio of CLIP_RATIOS with the least output error on
    that group's input block of hessian [K, K]; hessian None: plain round-to-nearest (ratio 1)."""
    n, k = w.shape
    g = k // group
    w = w.float()
    scale, zero = minmax_params(w, bits, group, symmetric)
    if hessian is None:
        return QWeight(quantize_groups(w, scale, zero, bits), scale, zero, bits, group)
    blocks = torch.stack([hessian[i * group:(i + 1) * group, i * group:(i + 1) * group] for i in range(g)])
    best = torch.full((n, g), float("inf"))
    for ratio in CLIP_RATIOS:
        s_r, z_r = minmax_params(w * ratio, bits, group, symmetric)
        d = (_dequantized(w, s_r, z_r, bits, group) - w).view(n, g, group)  # [N, G, group]
        err = torch.einsum("ngi,gij,ngj->ng", d, blocks.float(), d)  # [N, G]
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s_r, scale), torch.where(better, z_r, zero)
    return QWeight(quantize_groups(w, scale, zero, bits), scale, zero, bits, group)


def _dequantized(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """w [N, K] rounded onto the grid of scale/zero [N, G], back in float."""
    return QWeight(quantize_groups(w, scale, zero, bits), scale, zero, bits, group).dequantize()
