"""`quantize_model`: float checkpoint -> int4/int8 weight-only checkpoint (compressed-tensors), by RTN, GPTQ or AWQ.

What is quantized: every Linear of the decoder layers (attention q/k/v/o, dense FFN, shared experts, per-expert
routed experts). Kept in float: embeddings, norms, router gates, lm_head (the ORT backend stores the LM head in
int8 at load time). `int8_modules` (regexes) keeps the matching Linears in int8 when bits == 4 (mixed precision).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moemesh.quant import awq_plan
from moemesh.quant.awq import clip_quantize, one_thread, scaled_hessian
from moemesh.quant.calibration import DEFAULT_CALIB, FALLBACK, CalibrationDispatch, Hessians, attach_dense
from moemesh.quant.gptq import gptq
from moemesh.quant.grid import grid, grid_params
from moemesh.quant.packing import QWeight, rtn
from moemesh.quant.writer import packed_tensors, quantization_config, write_checkpoint

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|(mlp|block_sparse_moe)\."
                    r"((shared_experts?|experts\.\d+)\.)?(gate_proj|up_proj|down_proj|w1|w2|w3))\.weight$")
METHODS = ("rtn", "gptq", "grid", "awq")
FEW_TOKENS = 32_768  # calibration tokens below which GPTQ is warned about (the GPTQ paper used 128 x 2048)
GRID_MIN_FIT = 0.5  # grid: a tensor with fewer groups on a 4-bit grid than this is stored in int8 instead


@dataclass(frozen=True)
class QuantSettings:
    bits: int = 4
    method: str = "gptq"
    group_size: int = 32
    symmetric: bool = False
    calib: str = str(DEFAULT_CALIB)
    window: int = 512
    min_tokens: int = 16  # routed tokens below which an expert uses the FALLBACK Hessian (awq: awq_plan.FALLBACK)
    damp: float = 0.01
    # GPTQ only where the calibration tokens are >= this many times the Linear's inputs K; RTN elsewhere. Fewer make
    # the Hessian rank-deficient (rank <= tokens) and GPTQ fits the calibration text instead of the layer: SmolLM2's
    # down_proj (K 1536) on 1.6k tokens came out 2.3x worse than RTN on held-out inputs (3x better on the calibration
    # text itself); its K = 576 Linears on the same text beat RTN. See quant/gptq.py.
    tokens_per_input: float = 2.0
    int8_modules: tuple[str, ...] = field(default_factory=tuple)
    awq_clip: bool = True  # awq: per-group clip search after scaling (else plain round-to-nearest of W * s)
    awq_duo: bool = False  # awq: also search s = mean|x|^a / mean|w|^(1-a) (AutoAWQ's default) beside mean|x|^a
    # a group size that does not divide some K: the largest power-of-two divisor below it there (else an error)
    group_fallback: bool = True

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"--bits must be 4 or 8, got {self.bits}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {list(METHODS)}, got {self.method!r}")
        if self.group_size < 1:
            raise ValueError(f"--group-size must be positive, got {self.group_size}")
        if self.min_tokens < 0:
            raise ValueError(f"--min-tokens must be >= 0, got {self.min_tokens}")
        if not 0 < self.damp <= 10:
            raise ValueError(f"--damp must be in (0, 10], got {self.damp}")
        if not Path(self.calib).is_file():
            raise ValueError(f"--calib {self.calib!r} is not a file")


def collect_hessians(model_dir: Path, s: QuantSettings, log: Callable[[str], None]) -> tuple[Hessians, list]:
    """Runs the float model over the calibration text (windows of s.window tokens) recording input Hessians."""
    from moemesh.runtime.checkpoint import Checkpoint
    from moemesh.runtime.experts import PER_EXPERT_NAMES, moe_prefix
    from moemesh.runtime.engine import Engine
    from moemesh.tokenization.chat_tokenizer import ChatTokenizer

    engine = Engine.load(model_dir, kv_blocks=1)
    ids = ChatTokenizer.load(model_dir).encode(Path(s.calib).read_text(encoding="utf-8"))
    windows = [ids[i:i + s.window] for i in range(0, len(ids), s.window) if len(ids[i:i + s.window]) > 1]
    hessians = Hessians()
    with Checkpoint(model_dir) as ckpt:
        prefixes = {layer: moe_prefix(ckpt, layer) for layer in engine.spec.moe_layers}
        shared = {("shared", i): f"{p}.shared_experts" if f"{p}.shared_experts.gate_proj.weight" in ckpt
                  else f"{p}.shared_expert" for i, p in prefixes.items()}
        style = {i: next((n for n in PER_EXPERT_NAMES if f"{p}.experts.0.{n[0]}.weight" in ckpt), None)
                 for i, p in prefixes.items()}

    def names(layer: int, e: int) -> tuple[list[str], str]:
        gate, up, down = style[layer] or ("gate_proj", "up_proj", "down_proj")
        base = f"{prefixes[layer]}.experts.{e}"
        return [f"{base}.{gate}.weight", f"{base}.{up}.weight"], f"{base}.{down}.weight"

    handles = attach_dense(engine.backbone, hessians, shared)
    calib = None
    if engine.spec.moe is not None:
        calib = CalibrationDispatch(engine.dispatch.bank, hessians, names)
        engine.dispatch = calib
    try:
        for window in windows:
            engine.forward_logits([window])
    finally:
        for h in handles:
            h.remove()
    fell = calib.apply_fallback(s.min_tokens) if calib is not None else []
    if calib is not None:
        calib.export_layer_stats("model.layers.{}.moe_input")  # AWQ: the MoE input's all-token statistics
    tokens = sum(len(w) for w in windows)
    log(f"calibrated on {tokens} tokens of {s.calib} ({len(fell)} experts fell back)")
    if tokens < FEW_TOKENS and s.method == "gptq":
        log(f"warning: {tokens} calibration tokens is few for GPTQ: on smollm2 the shipped 1.6k-token text gives a "
            f"worse int4 perplexity than rtn (benchmarks/results/quant-quality-summary.md); give --calib a larger "
            f"text of the serving domain")
    return hessians, fell


def quantize_model(model_dir: Path, out: Path, s: QuantSettings, log: Callable[[str], None] = print,
                   progress: Callable | None = None) -> dict:
    """Writes the quantized checkpoint to `out`; returns the summary stored under config.moemesh_quantization."""
    start = time.perf_counter()
    items, dtypes, extra = quantize_tensors(model_dir, s, log, progress)
    tensors, modules = {}, {}
    for name, item in items.items():
        if not isinstance(item, QWeight):
            tensors[name] = item
            continue
        prefix = name.removesuffix(".weight")
        tensors.update(packed_tensors(prefix, item, dtypes[name], s.symmetric))
        modules.setdefault((item.bits, item.group), []).append(prefix)  # grid's int8 fallback: bits 8 here
    floats = (4,) if s.method == "grid" else ()
    extra["seconds"] = round(time.perf_counter() - start, 1)
    write_checkpoint(model_dir, out, tensors, quantization_config(modules, s.group_size, s.symmetric, floats), extra)
    return extra


def quantize_tensors(model_dir: Path, s: QuantSettings, log: Callable[[str], None] = print,
                     progress: Callable | None = None) -> tuple[dict, dict, dict]:
    """The quantized model in memory: (name -> float tensor, or QWeight for a quantized Linear; name -> the
    checkpoint dtype of each QWeight; the summary). Float tensors include AWQ's folded scales (norms, routers)."""
    from moemesh.runtime.checkpoint import Checkpoint

    s.validate()
    hessians, fell = collect_hessians(model_dir, s, log) if s.method in ("gptq", "awq") else (Hessians(), [])
    items, dtypes, groups = {}, {}, {}
    with Checkpoint(model_dir) as ckpt:
        linear = _linear_table(ckpt, s)
        with one_thread():
            plan = awq_scales(model_dir, ckpt, hessians, fell, s, progress) if s.method == "awq" else None
        for name in progress(ckpt.names()) if progress else ckpt.names():
            raw = ckpt.read(name)
            raw = plan.apply(name, raw) if plan is not None else raw
            if name not in linear:
                items[name] = raw
                continue
            bits, group = linear[name]
            items[name], dtypes[name] = _quantize(raw.float(), name, bits, group, s, hessians, plan), raw.dtype
            groups[group] = groups.get(group, 0) + 1
    short = sorted(n.removesuffix(".weight") for n, h in hessians.h.items()
                   if n in linear and hessians.tokens[n] < s.tokens_per_input * h.shape[0])  # GPTQ -> RTN
    other = {g: n for g, n in groups.items() if g != s.group_size}
    if other:
        log(f"--group-size {s.group_size} does not divide every input size: group sizes {other} (Linears) there")
    if short and s.method == "gptq":
        log(f"{len(short)} Linears have < {s.tokens_per_input} calibration tokens per input: round-to-nearest there")
    extra = {**asdict(s), "fallback": awq_plan.FALLBACK if s.method == "awq" else FALLBACK,
             "fell_back": [list(p) for p in fell], "rtn_too_few_tokens": short if s.method == "gptq" else [],
             "group_sizes": {str(g): n for g, n in sorted(groups.items())},
             **({"awq_alphas": plan.alphas} if plan is not None else {})}
    return items, dtypes, extra


def _bits(name: str, s: QuantSettings) -> int:
    prefix = name.removesuffix(".weight")
    return 8 if s.bits == 4 and any(re.search(p, prefix) for p in s.int8_modules) else s.bits


def _group(k: int, name: str, s: QuantSettings) -> int:
    """s.group_size, or where it does not divide K (SmolLM2's K = 576 with group 128) the largest power of two
    >= 16 dividing K below it (MatMulNBits takes powers of two >= 16); an error when there is none."""
    if k % s.group_size == 0:
        return s.group_size
    fits = [g for g in (2**i for i in range(4, 16)) if g < s.group_size and k % g == 0]
    if not fits or not s.group_fallback:
        raise ValueError(f"--group-size {s.group_size} does not divide the input size {k} of tensor {name!r} "
                         f"(use a divisor, e.g. 32 or 64)")
    return max(fits)


def _linear_table(ckpt, s: QuantSettings) -> dict[str, tuple[int, int]]:
    """Quantized weight name -> (bits, group size)."""
    return {n: (_bits(n, s), _group(ckpt.shape(n)[1], n, s)) for n in ckpt.names()
            if LINEAR.match(n) and len(ckpt.shape(n)) == 2}


def awq_scales(model_dir: Path, ckpt, hessians: Hessians, fell: list, s: QuantSettings,
               progress: Callable | None = None) -> awq_plan.Plan:
    """AWQ's searched scales for the float checkpoint `ckpt` (quant/awq_plan.py): applying the plan to every tensor
    leaves the float model's function unchanged; the quantized Linears are then rounded from the scaled weights."""
    import json

    from moemesh.runtime.experts import moe_prefix

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    fell_prefixes = {f"{moe_prefix(ckpt, layer)}.experts.{e}" for layer, e in fell}
    linear = _linear_table(ckpt, s)
    return awq_plan.plan_checkpoint(ckpt.read, set(ckpt.names()), config, hessians, fell_prefixes,
                                    lambda n: linear[n][0], lambda n: linear[n][1], s.symmetric, progress,
                                    s.awq_duo)


def _quantize(w: torch.Tensor, name: str, bits: int, group: int, s: QuantSettings, hessians: Hessians,
              plan: awq_plan.Plan | None = None):
    """One Linear's weight [N, K] (awq: already scaled by the plan) -> QWeight by the chosen method."""
    if s.method == "awq":  # clip search on the Hessian of the scaled input x / s
        h = hessians.h.get(name) if s.awq_clip and awq_plan.clip_allowed(name) else None
        if h is not None and name in plan.cols:
            h = scaled_hessian(h, plan.cols[name])
        with one_thread():
            return clip_quantize(w, h, bits, group, s.symmetric)
    if s.method == "gptq" and name in hessians.h and hessians.tokens[name] >= s.tokens_per_input * w.shape[1]:
        return gptq(w, hessians.h[name], bits, group, s.symmetric, s.damp)
    if s.method == "grid" and bits == 4:
        _, _, fits = grid_params(w, bits, group)
        if fits.float().mean() < GRID_MIN_FIT:  # not a re-encoded 4-bit model here: keep int8 quality
            return rtn(w, 8, group, s.symmetric)
        return grid(w, bits, group, rtn(w, bits, group, s.symmetric))
    return rtn(w, bits, group, s.symmetric)
