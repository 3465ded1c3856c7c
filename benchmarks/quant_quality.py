"""Perplexity with weight-only quantized FFN weights, on the CPU reference path (quant.py): `smollm2` (dense: its FFN is
quantized) and `smollm2-moe` (its routed experts), each unquantized, int8 and fp8 (per-channel scales), in one run.

    python benchmarks/quant_quality.py [--windows 4] [--window 1024]     # ~3 min on 2 CPU cores

Same scoring as `moemesh eval perplexity --quantization Q` (evaluate_perplexity) on ../shared/eval/wikitext2-test.raw,
the first windows x window tokens. Writes benchmarks/results/quant-quality.{json,md}; the issue-10 target is int8
within 0.5% of unquantized for both models.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EVAL_TEXT = ROOT.parent / "shared" / "eval" / "wikitext2-test.raw"
MODELS = ("smollm2", "smollm2-moe")
SCHEMES = ("none", "int8", "fp8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--text", type=Path, default=EVAL_TEXT)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from moemesh.evaluation.perplexity import evaluate_perplexity

    rows = []
    for model in MODELS:
        base = None
        for scheme in SCHEMES:
            started = time.perf_counter()
            r = evaluate_perplexity(model, args.text, max_tokens=args.windows * args.window, window=args.window,
                                    quantization=scheme)
            base = base or r.perplexity
            rows.append({"model": model, "quantization": scheme, "perplexity": round(r.perplexity, 4),
                         "vs_unquantized_pct": round(100 * (r.perplexity / base - 1), 3),
                         "predictions": r.predictions, "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
            "text": str(args.text), "windows": args.windows, "window": args.window, "device": "cpu float32"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant-quality.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Perplexity with weight-only quantized FFN weights ({args.windows} windows of {args.window} tokens, "
             "wikitext-2 test, CPU float32)", "", f"`{meta['command']}`", "",
             "| model | quantization | perplexity | vs unquantized |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['quantization']} | {r['perplexity']} | {r['vs_unquantized_pct']:+.3f}% |"
              for r in rows]
    lines += ["", "smollm2: the dense FFN (gate/up/down of every layer) quantized; smollm2-moe: the routed experts. "
              "int8 and fp8 (e4m3) are symmetric with one float32 scale per output channel, dequantized on the fly by "
              "the CPU reference path (the GPU kernels compute with the same values)."]
    (RESULTS / "quant-quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
