"""Cost of prompt logprobs on this CPU: the built-in smollm2-moe through runtime.engine.Engine, a prompt prefilled in
chunks, without prompt logprobs vs with prompt_logprobs 0 and 5 (runtime/prompt_logprobs.py: logits and log_softmax
at every prompt row instead of the last one only).

    python benchmarks/prompt_logprobs.py [--model smollm2-moe] [--tokens 256] [--chunk 128] [--repeats 3]

Each run prefills the same prompt (under its own prefix-cache salt: nothing is cached) and samples one token;
seconds are the median of `repeats`, modes interleaved. Writes benchmarks/results/prompt_logprobs.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moemesh.models.registry import resolve_model  # noqa: E402
from moemesh.runtime.engine import Engine  # noqa: E402
from moemesh.runtime.types import SamplingParams, SequenceWork  # noqa: E402
from moemesh.tokenization.chat_tokenizer import ChatTokenizer  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog; the cat sleeps on the warm windowsill. "
MODES = {"off": None, "prompt_logprobs=0": 0, "prompt_logprobs=5": 5}


def _prefill(engine: Engine, prompt: list[int], chunk: int, scored: int | None, tag: str) -> float:
    params = SamplingParams(max_tokens=1, prompt_tokens=len(prompt), prompt_logprobs=scored)
    start = time.perf_counter()
    for pos in range(0, len(prompt), chunk):
        end = min(len(prompt), pos + chunk)
        engine.step([SequenceWork(tag, prompt[pos:end], pos, params, sample=end == len(prompt), salt=tag)])
    seconds = time.perf_counter() - start
    engine.release([tag])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-moe")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model(args.model, progress=False)
    engine, tok = Engine.load(model_dir, model_name=args.model), ChatTokenizer.load(model_dir)
    prompt = (tok.encode(TEXT * (args.tokens // 10 + 1)))[: args.tokens]
    _prefill(engine, prompt, args.chunk, 5, "warm")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode, scored in MODES.items():
            times[mode].append(_prefill(engine, prompt, args.chunk, scored, f"{mode}-{r}"))
    base = statistics.median(times["off"])
    rows = [{"mode": m, "seconds": round(statistics.median(t), 4),
             "cost_pct": round(100 * (statistics.median(t) / base - 1), 1)} for m, t in times.items()]
    report = {"machine": f"{platform.machine()} {platform.processor() or ''} 1 thread, torch {torch.__version__}, "
                         f"load average {os.getloadavg()[0]:.1f}",
              "command": "python " + " ".join(sys.argv), "model": args.model, "tokens": len(prompt),
              "chunk": args.chunk, "repeats": args.repeats, "rows": rows}
    lines = [f"prefill of {len(prompt)} tokens in chunks of {args.chunk}", "",
             "| mode | seconds | cost |", "|---|---|---|"]
    lines += [f"| {r['mode']} | {r['seconds']} | {r['cost_pct']}% |" for r in rows]
    out = ROOT / "benchmarks" / "results"
    (out / "prompt_logprobs.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "prompt_logprobs.md").write_text(f"{report['command']}\n{report['machine']}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
