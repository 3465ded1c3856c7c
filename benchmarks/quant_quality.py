"""Perplexity of quantized checkpoints (from `moemesh quantize`) against their float model, on the torch engine
(the weights' own error) and on the ONNX Runtime backend (plus MatMulNBits' int8 activations), in one run.

    python benchmarks/quant_quality.py --model smollm2 LABEL=DIR [LABEL=DIR ...]
        [--text ../shared/eval/wikitext2-test.raw] [--max-tokens 2048] [--window 512] [--out NAME]

Few windows on purpose (2 shared cores): the default scores 4 windows of 512 tokens. The eval text is held out:
nothing here tunes on it (calibration text: moemesh/quant/data/calib_en.txt). Writes
benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("checkpoints", nargs="+", help="LABEL=DIR")
    p.add_argument("--text", default=str(ROOT.parent / "shared" / "eval" / "wikitext2-test.raw"))
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--out", default="quant-quality")
    ns = p.parse_args(argv)
    from moemesh.evaluation.perplexity import evaluate_perplexity

    load = os.getloadavg()

    def ppl(model: str, backend: str) -> float:
        return evaluate_perplexity(model, ns.text, max_tokens=ns.max_tokens, window=ns.window,
                                   backend=backend).perplexity

    base = ppl(ns.model, "torch")
    rows = [{"checkpoint": f"{ns.model} float32", "torch": round(base, 3), "onnxruntime": None}]
    for item in ns.checkpoints:
        label, _, path = item.partition("=")
        config = json.loads((Path(path) / "config.json").read_text()).get("moemesh_quantization", {})
        torch_ppl, ort_ppl = ppl(path, "torch"), ppl(path, "onnxruntime")
        rows.append({"checkpoint": label, "method": config.get("method"), "bits": config.get("bits"),
                     "group_size": config.get("group_size"), "symmetric": config.get("symmetric"),
                     "int8_modules": config.get("int8_modules"), "torch": round(torch_ppl, 3),
                     "onnxruntime": round(ort_ppl, 3), "torch_delta_pct": round(100 * (torch_ppl / base - 1), 2),
                     "ort_delta_pct": round(100 * (ort_ppl / base - 1), 2)})
    result = {"command": "python " + " ".join(sys.argv), "model": ns.model, "text": ns.text,
              "max_tokens": ns.max_tokens, "window": ns.window, "load_average": [round(x, 2) for x in load],
              "rows": rows}
    lines = ["| checkpoint | method | bits | group | torch ppl (delta) | ORT ppl (delta) |",
             "|---|---|---|---|---|---|"]
    lines.append(f"| {ns.model} float32 | - | 32 | - | {base:.3f} | - |")
    for r in rows[1:]:
        lines.append(f"| {r['checkpoint']} | {r['method']} | {r['bits']} | {r['group_size']} | {r['torch']} "
                     f"({r['torch_delta_pct']:+.2f}%) | {r['onnxruntime']} ({r['ort_delta_pct']:+.2f}%) |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results"
    (out / f"{ns.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{ns.out}.md").write_text(f"# Quantized perplexity: {ns.model}\n\n`{result['command']}`\n\n"
                                      f"{ns.max_tokens} tokens of {ns.text} in windows of {ns.window}; load "
                                      f"average {result['load_average']}.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
