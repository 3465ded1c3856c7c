"""`quantize_model`: float checkpoint -> int4/int8 weight-only checkpoint (compressed-tensors), by RTN or GPTQ.

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

from moemesh.quant.calibration import DEFAULT_CALIB, FALLBACK, CalibrationDispatch, Hessians, attach_dense
from moemesh.quant.gptq import gptq
from moemesh.quant.grid import grid, grid_params
from moemesh.quant.packing import rtn
from moemesh.quant.writer import packed_tensors, quantization_config, write_checkpoint

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|(mlp|block_sparse_moe)\."
                    r"((shared_experts?|experts\.\d+)\.)?(gate_proj|up_proj|down_proj|w1|w2|w3))\.weight$")
METHODS = ("rtn", "gptq", "grid")
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
    min_tokens: int = 16  # routed tokens below which an expert uses the FALLBACK Hessian
    damp: float = 0.01
    # GPTQ only where the calibration tokens are >= this many times the Linear's inputs K; RTN elsewhere. Fewer make
    # the Hessian rank-deficient (rank <= tokens) and GPTQ fits the calibration text instead of the layer: SmolLM2's
    # down_proj (K 1536) on 1.6k tokens came out 2.3x worse than RTN on held-out inputs (3x better on the calibration
    # text itself); its K = 576 Linears on the same text beat RTN. See quant/gptq.py.
    tokens_per_input: float = 2.0
    int8_modules: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"--bits must be 4 or 8, got {self.bits}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {list(METHODS)}, got {self.method!r}")
        if self.group_size < 1:
            raise ValueError(f"--group-size must be positive, got {self.group_size}")
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
    tokens = sum(len(w) for w in windows)
    log(f"calibrated on {tokens} tokens of {s.calib} ({len(fell)} experts fell back)")
    if tokens < FEW_TOKENS:
        log(f"warning: {tokens} calibration tokens is few for GPTQ: on smollm2 the shipped 1.6k-token text gives a "
            f"worse int4 perplexity than rtn (benchmarks/results/quant-quality-summary.md); give --calib a larger "
            f"text of the serving domain")
    return hessians, fell


def quantize_model(model_dir: Path, out: Path, s: QuantSettings, log: Callable[[str], None] = print,
                   progress: Callable | None = None) -> dict:
    """Writes the quantized checkpoint to `out`; returns the summary stored under config.moemesh_quantization."""
    from moemesh.runtime.checkpoint import Checkpoint

    s.validate()
    start = time.perf_counter()
    hessians, fell = collect_hessians(model_dir, s, log) if s.method == "gptq" else (Hessians(), [])
    tensors, modules = {}, {}
    with Checkpoint(model_dir) as ckpt:
        names = ckpt.names()
        bar = progress(names) if progress else names
        for name in bar:
            raw = ckpt.read(name)
            if not LINEAR.match(name) or raw.dim() != 2:
                tensors[name] = raw
                continue
            prefix = name.removesuffix(".weight")
            bits = 8 if s.bits == 4 and any(re.search(p, prefix) for p in s.int8_modules) else s.bits
            group = s.group_size
            if raw.shape[1] % group:
                raise ValueError(f"--group-size {group} does not divide the input size {raw.shape[1]} of tensor "
                                 f"{name!r} (use a divisor, e.g. 32 or 64)")
            qw = _quantize(raw.float(), name, bits, group, s, hessians)
            tensors.update(packed_tensors(prefix, qw, raw.dtype, s.symmetric))
            modules.setdefault(bits, []).append(prefix)
    for bits in list(modules):  # a grid tensor that fell back to int8 sits in the int8 group
        for prefix in list(modules[bits]):
            actual = 8 if tensors[f"{prefix}.weight_packed"].shape[1] * 4 == tensors[f"{prefix}.weight_shape"][1] \
                else 4
            if actual != bits:
                modules[bits].remove(prefix)
                modules.setdefault(actual, []).append(prefix)
    modules = {b: m for b, m in modules.items() if m}
    floats = (4,) if s.method == "grid" else ()
    short = sorted(n.removesuffix(".weight") for n, h in hessians.h.items()
                   if hessians.tokens[n] < s.tokens_per_input * h.shape[0])  # GPTQ -> RTN: too few tokens
    if short:
        log(f"{len(short)} Linears have < {s.tokens_per_input} calibration tokens per input: round-to-nearest there")
    extra = {**asdict(s), "fallback": FALLBACK, "fell_back": [list(p) for p in fell], "rtn_too_few_tokens": short,
             "seconds": round(time.perf_counter() - start, 1)}
    write_checkpoint(model_dir, out, tensors, quantization_config(modules, s.group_size, s.symmetric, floats), extra)
    return extra


def _quantize(w: torch.Tensor, name: str, bits: int, group: int, s: QuantSettings, hessians: Hessians):
    """One Linear's weight [N, K] -> QWeight by the chosen method."""
    if s.method == "gptq" and name in hessians.h and hessians.tokens[name] >= s.tokens_per_input * w.shape[1]:
        return gptq(w, hessians.h[name], bits, group, s.symmetric, s.damp)
    if s.method == "grid" and bits == 4:
        _, _, fits = grid_params(w, bits, group)
        if fits.float().mean() < GRID_MIN_FIT:  # not a re-encoded 4-bit model here: keep int8 quality
            return rtn(w, 8, group, s.symmetric)
        return grid(w, bits, group, rtn(w, bits, group, s.symmetric))
    return rtn(w, bits, group, s.symmetric)
