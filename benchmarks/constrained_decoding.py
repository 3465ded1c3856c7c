"""Cost of grammar-constrained decoding on this CPU: the built-in smollm2-moe through runtime.engine.Engine, batch 1
and batch 8, decode steps with no grammar vs every sequence under a JSON Schema (xgrammar masks, runtime/grammar.py),
plus how many constrained outputs parse and validate.

    python benchmarks/constrained_decoding.py [--model smollm2-moe] [--steps 24] [--repeats 3] [--tries 20]

Timing: one prefill step, then `steps` decode steps of Engine.step at temperature 0.7 with ignore_eos (so every run
decodes the same number of steps; a finished JSON then only admits end-of-sequence tokens, which costs the same
mask work). tokens/s = batch x steps / seconds, median of `repeats`, interleaved. Validity: `tries` sampled answers
(seeded, max_tokens 48, stopping at end-of-sequence) parsed with json.loads and validated with jsonschema.
Writes benchmarks/results/constrained_decoding.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moemesh.models.registry import resolve_model  # noqa: E402
from moemesh.runtime.engine import Engine  # noqa: E402
from moemesh.runtime.types import Guided, SamplingParams, SequenceWork  # noqa: E402
from moemesh.tokenization.chat_tokenizer import ChatTokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string", "maxLength": 20}},
          "required": ["name", "age", "city"], "additionalProperties": False}
PROMPT = [{"role": "user", "content": "Invent a person. Answer in JSON with name, age and city."}]


def _run(engine: Engine, prompt: list[int], batch: int, steps: int, guided: Guided | None, tag: str) -> float:
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=steps + 8, ignore_eos=True, guided=guided,
                            prompt_tokens=len(prompt))
    ids = [f"{tag}-{i}" for i in range(batch)]
    results = engine.step([SequenceWork(i, prompt, 0, params) for i in ids])
    last = {r.seq_id: r.token_id for r in results}
    start = time.perf_counter()
    for k in range(steps):
        works = [SequenceWork(i, [last[i]], len(prompt) + k, params) for i in ids]
        last = {r.seq_id: r.token_id for r in engine.step(works)}
    seconds = time.perf_counter() - start
    engine.release(ids)
    return batch * steps / seconds


def _answer(engine: Engine, tok: ChatTokenizer, prompt: list[int], seed: int) -> str:
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=48, guided=Guided(json_schema=json.dumps(SCHEMA)),
                            prompt_tokens=len(prompt))
    seq, out = f"v{seed}", []
    result = engine.step([SequenceWork(seq, prompt, 0, params)])[0]
    while result.token_id not in engine.spec.eos_token_ids and len(out) < params.max_tokens:
        out.append(result.token_id)
        if len(out) == params.max_tokens:
            break
        result = engine.step([SequenceWork(seq, [out[-1]], len(prompt) + len(out) - 1, params)])[0]
    engine.release([seq])
    return tok.decode(out, skip_special_tokens=True)


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-moe")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tries", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model(args.model, progress=False)
    engine, tok = Engine.load(model_dir, model_name=args.model), ChatTokenizer.load(model_dir)
    prompt = tok.encode_chat(PROMPT)[0]
    guided = Guided(json_schema=json.dumps(SCHEMA))
    _run(engine, prompt, 1, 2, guided, "warm")  # builds the grammar book and compiles the schema (cached)
    rows = []
    for batch in (1, 8):
        free, constrained = [], []
        for r in range(args.repeats):
            free.append(_run(engine, prompt, batch, args.steps, None, f"f{batch}-{r}"))
            constrained.append(_run(engine, prompt, batch, args.steps, guided, f"c{batch}-{r}"))
        f, c = statistics.median(free), statistics.median(constrained)
        rows.append({"batch": batch, "free_tok_s": round(f, 2), "constrained_tok_s": round(c, 2),
                     "cost_pct": round(100 * (1 - c / f), 1)})
    answers = [_answer(engine, tok, prompt, seed) for seed in range(args.tries)]
    valid = sum(_valid(a) for a in answers)
    report = {"machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} thread(s), "
                         f"torch {torch.__version__}".strip(),
              "command": "python " + " ".join(sys.argv), "model": args.model, "steps": args.steps,
              "repeats": args.repeats, "rows": rows, "valid": valid, "tries": args.tries, "example": answers[0]}
    lines = ["| batch | free tok/s | constrained tok/s | cost |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['free_tok_s']} | {r['constrained_tok_s']} | {r['cost_pct']}% |" for r in rows]
    lines.append(f"\nvalid JSON against the schema: {valid}/{args.tries} (e.g. {answers[0]})")
    out = ROOT / "benchmarks" / "results"
    (out / "constrained_decoding.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "constrained_decoding.md").write_text(f"{report['command']}\n{report['machine']}\n\n" + "\n".join(lines)
                                                 + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
