"""Perplexity of quantized checkpoints (from `moemesh quantize`) against their float model on two held-out texts, on
the torch engine (the weights' own error) and on the ONNX Runtime backend (plus MatMulNBits' int8 activations).

    python benchmarks/quant_quality.py --model smollm2 LABEL=DIR [LABEL=DIR ...]
        [--text FILE --text FILE] [--max-tokens 2048] [--window 512] [--out NAME] [--base-from NAME]

Texts (both held out: nothing here or in `moemesh quantize` tunes on them): ../shared/eval/wikitext2-test.raw
(Wikipedia) and benchmarks/data/heldout_us_founding.txt (18th-19th century public-domain prose, see
benchmarks/data/README.md). Calibration uses moemesh/quant/data/ (or --calib). Few windows on
purpose (2 shared cores): the default scores 4 windows of 512 tokens per text. Writes
benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXTS = {"wikitext2": ROOT.parent / "shared" / "eval" / "wikitext2-test.raw",
         "us-founding": ROOT / "benchmarks" / "data" / "heldout_us_founding.txt"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("checkpoints", nargs="*", help="LABEL=DIR")
    p.add_argument("--text", action="append", help="held-out text (repeatable; default: the two above)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--out", default="quant-quality")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime, packed "
                   "(packed also scores the float model itself: its int8 weights and bf16 activations)")
    p.add_argument("--base-from", default="", help="take the float32 row from benchmarks/results/<NAME>.json (same "
                   "model, texts, --max-tokens and --window; perplexity is deterministic) instead of recomputing it")
    p.add_argument("--engine-quant", default="", help="comma-separated Engine.load weight-only schemes (fp8, int8) "
                   "of --model itself, quantized on load (quant.py's rules); torch rows only")
    ns = p.parse_args(argv)
    from moemesh.evaluation.perplexity import evaluate_perplexity

    texts = {Path(t).stem: Path(t) for t in ns.text} if ns.text else TEXTS
    load = os.getloadavg()

    def ppl(model: str, backend: str, quantization: str = "none") -> dict[str, float]:
        return {name: round(evaluate_perplexity(model, str(path), max_tokens=ns.max_tokens, window=ns.window,
                                                backend=backend, quantization=quantization).perplexity, 3)
                for name, path in texts.items()}

    base = reused_base(ns) if ns.base_from else ppl(ns.model, "torch")
    packed = "packed" in ns.backends
    rows = [{"checkpoint": f"{ns.model} float32" + (f" (from {ns.base_from})" if ns.base_from else ""),
             "method": "-", "bits": 32, "group_size": "-", "torch": base, "onnxruntime": None,
             "packed": ppl(ns.model, "packed") if packed else None}]
    print(rows[0], flush=True)
    for item in ns.checkpoints:
        label, _, path = item.partition("=")
        config = json.loads((Path(path) / "config.json").read_text()).get("moemesh_quantization", {})
        rows.append({"checkpoint": label, "method": config.get("method"), "bits": config.get("bits"),
                     "group_size": config.get("group_size"), "symmetric": config.get("symmetric"),
                     "int8_modules": config.get("int8_modules"), "calib": config.get("calib"),
                     "group_sizes": config.get("group_sizes"),  # where --group-size did not divide K
                     "torch": ppl(path, "torch"),
                     "onnxruntime": ppl(path, "onnxruntime") if "onnxruntime" in ns.backends else None,
                     "packed": ppl(path, "packed") if packed else None})
        print(rows[-1], flush=True)
    for scheme in filter(None, ns.engine_quant.split(",")):  # Engine.load(quantization=...): no checkpoint
        with w8a8_emulation(scheme == "fp8-w8a8"):
            got = ppl(ns.model, "torch", scheme.removesuffix("-w8a8"))
        rows.append({"checkpoint": f"{ns.model} --quantization {scheme}", "method": "engine " + scheme, "bits": 8,
                     "group_size": engine_rule(scheme), "torch": got, "onnxruntime": None})
        print(rows[-1], flush=True)
    result = {"command": "python " + " ".join(sys.argv), "model": ns.model, "texts": {k: str(v) for k, v in
              texts.items()}, "max_tokens": ns.max_tokens, "window": ns.window,
              "load_average": [round(x, 2) for x in load], "rows": rows}
    table = render(rows, base, list(texts))
    print(table)
    out = ROOT / "benchmarks" / "results"
    (out / f"{ns.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{ns.out}.md").write_text(
        f"# Quantized perplexity: {ns.model}\n\n`{result['command']}`\n\n{ns.max_tokens} tokens of each text in "
        f"windows of {ns.window}; load average {result['load_average']}. Delta: against the float32 model on the "
        f"torch engine.\n\n{table}\n")
    return 0


def reused_base(ns: argparse.Namespace) -> dict[str, float]:
    """The float32 row of an earlier run, checked to match this one's settings."""
    prev = json.loads((ROOT / "benchmarks" / "results" / f"{ns.base_from}.json").read_text())
    for key, value in (("max_tokens", ns.max_tokens), ("window", ns.window)):
        if prev[key] != value:
            raise SystemExit(f"--base-from {ns.base_from}: its {key} is {prev[key]}, this run's {value}")
    return prev["rows"][0]["torch"]


@contextlib.contextmanager
def w8a8_emulation(on: bool):
    """fp8-w8a8: the routed experts computed with the GPU prefill's numerics (gpu/prefill_fp8.py: each token's input
    and each expert's act rounded to e4m3 as well as the weights), by its torch reference, here on the CPU. The act
    gets one scale per row and expert (the kernel: per 128 columns; SmolLM2-MoE's experts have 192)."""
    from moemesh.runtime.experts import ExpertBank

    forward = ExpertBank.forward

    def emulated(self, layer, hidden, topk_ids, topk_weights, out=None, float32_ok=False):
        from moemesh.runtime.gpu.prefill_fp8 import w8a8_reference

        gate_up, down = self.gate_up[layer], self.down[layer]
        y = w8a8_reference(hidden, gate_up, down, topk_ids.long(), topk_weights, act_group=down.shape[2])
        return y.to(hidden.dtype) if out is None else out.copy_(y)
    ExpertBank.forward = ExpertBank.__call__ = emulated if on else forward
    try:
        yield
    finally:
        ExpertBank.forward = ExpertBank.__call__ = forward


def engine_rule(scheme: str) -> str:
    """What Engine.load(quantization=scheme) does to a dense FFN (quant.quantize_dense_ffn), for the table."""
    from moemesh.runtime.quant import FP8_BLOCK_K

    if scheme == "fp8-w8a8":
        return f"{FP8_BLOCK_K} (dense FFN; experts: channel, activations e4m3 per token / expert row)"
    return f"{FP8_BLOCK_K} (dense FFN; experts: channel)" if scheme == "fp8" else "channel"


def render(rows: list[dict], base: dict[str, float], texts: list[str]) -> str:
    def cell(value: float | None, text: str) -> str:
        return "-" if value is None else f"{value} ({100 * (value / base[text] - 1):+.2f}%)"

    packed = any(r.get("packed") for r in rows)
    head = "".join(f" {t} torch | {t} ORT |" + (f" {t} packed |" if packed else "") for t in texts)
    lines = [f"| checkpoint | method | bits | group |{head}",
             "|---|---|---|---|" + ("---|---|---|" if packed else "---|---|") * len(texts)]
    for r in rows:
        cells = "".join(f" {cell(r['torch'][t], t)} | {cell((r['onnxruntime'] or {}).get(t), t)} |" +
                        (f" {cell((r.get('packed') or {}).get(t), t)} |" if packed else "") for t in texts)
        lines.append(f"| {r['checkpoint']} | {r['method']} | {r['bits']} | {r['group_size']} |{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
