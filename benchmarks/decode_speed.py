"""Decode speed on this CPU: smollm2 and smollm2-moe through the runtime beside transformers' generate() on the same
dense weights, batch 1 and batch 8, in one run.

    python benchmarks/decode_speed.py [--steps 32] [--repeats 3] [--prompt-len 32]

Runtime: one prefill step (all prompts), then `steps` greedy decode steps of Engine.step, timed alone.
transformers: generate(max_new_tokens=steps+1) minus generate(max_new_tokens=1) (the prefill and first token), so
both count the same decode steps. tokens/s = batch x steps / decode seconds; median of `repeats` runs,
interleaved across the models; "backend packed" is smollm2-moe on torch's int8 / int4 CPU kernels (runtime/packed.py:
the built-in's GGUF-born projections keep their exact int4 codes). The reference, where llama-cpp-python is installed
(not a dependency: e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON" pip install llama-cpp-python): llama.cpp on the
built-in's own Q4_1 GGUF (the dense model), batch 1, the same prompt ids, greedy, 2 threads.
Writes benchmarks/results/decode_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LOAD_AT_START = os.getloadavg()[0]
sys.path.insert(0, str(ROOT))

TEXT = ("The history of the region begins with small farming villages along the river, which grew into market towns "
        "as trade with the coast increased. By the twelfth century the largest of them had walls, a cathedral and a "
        "charter granting its merchants the right to hold a weekly fair, and the surrounding countryside supplied "
        "wool, grain and timber to buyers from across the sea.")


def prompts(model_dir: Path, batch: int, length: int) -> list[list[int]]:
    from moemesh.tokenization.chat_tokenizer import ChatTokenizer

    ids = ChatTokenizer.load(model_dir).encode(TEXT)
    if len(ids) < length + batch:
        raise ValueError(f"prompt text too short for {batch} prompts of {length} tokens")
    return [ids[i:i + length] for i in range(batch)]  # equal lengths: no padding for transformers


def runtime_decode(engine, batch_prompts: list[list[int]], steps: int) -> float:
    """Seconds for `steps` decode steps of the whole batch through Engine.step (after its prefill step)."""
    from moemesh.runtime.types import SamplingParams, SequenceWork

    sampling = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
    works = [SequenceWork(f"s{i}", p, 0, sampling) for i, p in enumerate(batch_prompts)]
    results = engine.step(works)
    positions = [len(p) for p in batch_prompts]
    start = time.perf_counter()
    for _ in range(steps):
        works = [SequenceWork(f"s{i}", [r.token_id], positions[i], sampling) for i, r in enumerate(results)]
        results = engine.step(works)
        positions = [p + 1 for p in positions]
    seconds = time.perf_counter() - start
    engine.release([f"s{i}" for i in range(len(batch_prompts))])
    return seconds


def hf_decode(model, batch_prompts: list[list[int]], steps: int) -> float:
    ids = torch.tensor(batch_prompts)
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=2)

    def timed(new: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 **kwargs)
        assert out.shape[1] == ids.shape[1] + new
        return time.perf_counter() - start

    return timed(steps + 1) - timed(1)


def llama_cpp_decoder(threads: int):
    """A function (prompt ids, steps) -> decode seconds on llama.cpp over the built-in GGUF, or None when
    llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import numpy as np

    from moemesh.builtin.gguf_source import builtin_gguf_path

    llm = Llama(model_path=str(builtin_gguf_path()), n_ctx=512, n_threads=threads, n_batch=512, verbose=False)

    def decode(prompt: list[int], steps: int) -> float:
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - start

    return decode


def measure(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per name; the runs are interleaved (A B C A B C ...) so load from other jobs on shared cores
    hits every model alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ns = p.parse_args()
    from transformers import LlamaForCausalLM

    from moemesh.models.registry import resolve_model

    from moemesh.runtime.engine import Engine

    dense, moe = resolve_model("smollm2"), resolve_model("smollm2-moe")
    hf = LlamaForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    engines = {name: Engine.load(path, kv_blocks=64) for name, path in (("dense", dense), ("moe", moe))}
    engines["moe-packed"] = Engine.load(moe, kv_blocks=64, backend="packed")
    llama = llama_cpp_decoder(torch.get_num_threads())  # int8 weights, bf16 activations
    rows = []
    for batch in ns.batches:
        batch_prompts = prompts(dense, batch, ns.prompt_len)
        runs = {"smollm2 (runtime)": lambda: runtime_decode(engines["dense"], batch_prompts, ns.steps),
                "smollm2-moe (runtime, 8 of 8 experts)":
                    lambda: runtime_decode(engines["moe"], batch_prompts, ns.steps),
                f"smollm2-moe (runtime, backend packed: {engines['moe-packed'].info.quantization})":
                    lambda: runtime_decode(engines["moe-packed"], batch_prompts, ns.steps),
                "smollm2 (transformers generate)": lambda: hf_decode(hf, batch_prompts, ns.steps)}
        if llama is not None and batch == 1:
            runs["smollm2 Q4_1 GGUF (llama.cpp, reference)"] = lambda: llama(batch_prompts[0], ns.steps)
        for name, seconds in measure(runs, ns.repeats).items():
            rows.append({"model": name, "batch": batch, "decode_steps": ns.steps, "seconds": round(seconds, 3),
                         "tokens_per_s": round(batch * ns.steps / seconds, 2)})
            print(f"{name:42s} batch {batch}: {rows[-1]['tokens_per_s']:8.2f} tok/s", flush=True)
    result = {"command": "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_avg_1m_at_start": LOAD_AT_START, "load_avg_1m_at_end": os.getloadavg()[0],
                          "torch": torch.__version__},
              "prompt_len": ns.prompt_len, "rows": rows}
    out = ROOT / "benchmarks" / "results" / "decode_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| model | batch | decode tok/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['tokens_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
