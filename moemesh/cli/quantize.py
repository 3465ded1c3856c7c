"""`moemesh quantize MODEL --bits {4,8} --method {awq,gptq,rtn,grid} [--group-size 32] [--calib FILE] --out DIR`.

Writes a compressed-tensors (pack-quantized) checkpoint that `moemesh up --model DIR` (torch or
`--backend onnxruntime`), `moemesh eval perplexity --model DIR` and transformers / vLLM load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="int4/int8 weight-only quantization (AWQ, GPTQ or round-to-nearest)")
    p.add_argument("model", help="built-in name (smollm2, smollm2-moe), checkpoint dir or HF repo id")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--method", choices=("awq", "gptq", "rtn", "grid"), default="rtn",
                   help="awq: activation-aware scales searched per layer on the calibration text, folded into the "
                   "norms / preceding Linears, then round-to-nearest with a clip search (quant/awq.py; MoE experts "
                   "on their routed tokens, the few-token rule in quant/awq_plan.py); gptq: calibrated (Hessian of "
                   "each Linear's input; Linears with fewer than 2 calibration tokens per input are rounded to "
                   "nearest instead: see quant/gptq.py); rtn: round to nearest, no data; grid: exact re-encoding of "
                   "weights already on a 4-bit grid (GGUF-born models such as the built-in smollm2), int8 for "
                   "tensors that are not")
    p.add_argument("--group-size", type=int, default=32,
                   help="input columns per scale; where it does not divide a Linear's K (SmolLM2: 576 with 128), the "
                   "largest power of two >= 16 dividing K below it (recorded in config.json)")
    p.add_argument("--symmetric", action="store_true", help="symmetric codes (default: asymmetric, zero points)")
    p.add_argument("--int8", action="append", default=[], metavar="REGEX",
                   help="with --bits 4: keep modules matching REGEX in int8 (repeatable), e.g. 'down_proj$'")
    p.add_argument("--calib", default=None,
                   help="gptq/awq: UTF-8 calibration text (default: moemesh/quant/data/calib_en.txt)")
    p.add_argument("--awq-duo", action="store_true",
                   help="awq: also try weight-aware scales mean|x|^a / mean|w|^(1-a) (AutoAWQ's default; 2x search)")
    p.add_argument("--no-awq-clip", dest="awq_clip", action="store_false",
                   help="awq: skip the per-group clip search (round W * s to nearest over its full range)")
    p.add_argument("--min-tokens", type=int, default=16,
                   help="gptq/awq: routed calibration tokens below which an expert falls back (see --method)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="gptq: Hessian dampening, a fraction of its mean diagonal (higher: closer to round-to-nearest, "
                   "safer with little calibration text)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moemesh.models.registry import resolve_model
    from moemesh.quant.quantizer import QuantSettings, quantize_model

    settings = QuantSettings(bits=ns.bits, method=ns.method, group_size=ns.group_size, symmetric=ns.symmetric,
                             int8_modules=tuple(ns.int8), damp=ns.damp,
                             min_tokens=ns.min_tokens, awq_duo=ns.awq_duo, awq_clip=ns.awq_clip, **({"calib": ns.calib} if ns.calib else {}))
    try:
        settings.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_dir = resolve_model(ns.model, progress=True)
    bar = lambda names: tqdm(names, desc="quantize", unit="tensor", file=sys.stderr)  # noqa: E731
    log = lambda msg: print(f"[quantize] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    summary = quantize_model(model_dir, Path(ns.out), settings, log=log, progress=bar)
    print(f"wrote {ns.out} ({settings.method} int{settings.bits} group {settings.group_size}, "
          f"{summary['seconds']} s)")
    return 0
