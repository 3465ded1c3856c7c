"""CPU decode speed, batch 1, greedy, of a built-in model in one run: the torch float32 engine, torch's packed
int4/int8 kernels (`make run`'s backend), the ONNX Runtime backend on an int8 and an int4 checkpoint (a decode step
as one ORT call, runtime/ort/step_graph.py; and the int4 one with a call per layer, as before it), and llama.cpp on
the dense model's own Q4_1 GGUF (when llama-cpp-python is installed; else FACTS.md's 16.8 ms/token is cited, marked
as not measured here). The line cited for the MoE model is the dense model's: the same weights, 8 of 8 experts.

    python benchmarks/cpu_quant.py [--int8 DIR] [--int4 DIR] [--model smollm2] [--steps 64] [--repeats 3]
        [--threads 2]

DIRs come from `moemesh quantize`; left out, they are made once (int8 rtn symmetric, int4 grid, both group 32: no
calibration, about a minute) under MOEMESH_HOME/quant/ and reused, so a re-run takes a few minutes.
ms/token = decode seconds / steps after one prefill step of a 32-token prompt (median of `repeats`, engines
interleaved). Writes benchmarks/results/cpu-quant.{json,md} (cpu-quant-<model> for another model) with the
machine, the load average before and after, and the command.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_speed import llama_cpp_decoder, prompts, runtime_decode  # noqa: E402  (same prompts, loop)

LLAMA_FACT_MS = 16.8  # ../shared/FACTS.md: llama-cpp-python 0.3.36, Q4_1 GGUF, 2 threads, batch 1


def engine_ms(engine, prompt: list[int], steps: int) -> float:
    return runtime_decode(engine, [prompt], steps) / steps * 1e3


def one_thread(run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def llama_runner(threads: int):
    """A callable (prompt ids, steps) -> ms/token on llama.cpp over the built-in GGUF (decode_speed's), or None when
    llama-cpp-python is not installed."""
    decode = llama_cpp_decoder(threads)
    return None if decode is None else (lambda prompt, steps: decode(prompt, steps) / steps * 1e3)


def cached_checkpoint(model_dir: Path, model: str, bits: int, method: str) -> str:
    """MOEMESH_HOME/quant/<model>-int<bits>-<method>, quantized on first use (group 32, symmetric for int8)."""
    from moemesh.home import subdir
    from moemesh.quant.quantizer import QuantSettings, quantize_model

    out = subdir("quant") / f"{Path(model).name}-int{bits}-{method}"
    if not (out / "model.safetensors").exists():
        quantize_model(model_dir, out, QuantSettings(bits=bits, method=method, group_size=32, symmetric=bits == 8))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--int8", help="int8 checkpoint dir (moemesh quantize --bits 8); default: made once, see above")
    p.add_argument("--int4", help="int4 checkpoint dir (moemesh quantize --bits 4); default: made once, see above")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    os.environ.setdefault("ORT_THREADS", str(ns.threads))
    load_before = os.getloadavg()
    from moemesh.models.registry import resolve_model
    from moemesh.runtime.engine import Engine

    model_dir = resolve_model(ns.model, progress=True)
    ns.int8 = ns.int8 or cached_checkpoint(model_dir, ns.model, 8, "rtn")
    ns.int4 = ns.int4 or cached_checkpoint(model_dir, ns.model, 4, "grid")
    prompt = prompts(model_dir, 1, 32)[0]
    runs = {"torch float32": Engine.load(model_dir),
            "torch packed (make run's backend)": Engine.load(model_dir, backend="packed"),
            "onnxruntime int8": Engine.load(ns.int8, backend="onnxruntime"),
            "onnxruntime int4": Engine.load(ns.int4, backend="onnxruntime"),
            "onnxruntime int4, a call per layer": Engine.load(ns.int4, backend="onnxruntime")}
    runs["onnxruntime int4, a call per layer"].backbone.step_path.off = "the per-layer row"  # step_path.py
    timers = {name: (lambda e=e: engine_ms(e, prompt, ns.steps)) for name, e in runs.items()}
    # torch's OpenMP pool suffers most when other processes load the cores: its best thread count is shown too.
    timers["torch float32, 1 thread"] = lambda: one_thread(lambda: engine_ms(runs["torch float32"], prompt, ns.steps))
    llama = llama_runner(ns.threads)
    if llama is not None:
        timers["llama.cpp Q4_1 GGUF"] = lambda: llama(prompt, ns.steps)
    for t in timers.values():  # warm-up: first-call allocations, ORT arenas
        t()
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(ns.repeats):
        for name, t in timers.items():
            samples[name].append(t())
    rows = [{"engine": name, "model": ns.model, "ms_per_token": round(statistics.median(v), 2),
             "samples_ms": [round(x, 2) for x in v], "measured": True} for name, v in samples.items()]
    if llama is None:
        rows.append({"engine": "llama.cpp Q4_1 GGUF (FACTS.md, not measured here)", "ms_per_token": LLAMA_FACT_MS,
                     "samples_ms": [], "measured": False})
    write(rows, ns, load_before, os.getloadavg())
    return 0


def write(rows: list[dict], ns, load_before, load_after) -> None:
    base = min(r["ms_per_token"] for r in rows if r["engine"].startswith("torch float32"))  # its best setting
    for r in rows:
        r["speedup_vs_torch"] = round(base / r["ms_per_token"], 2)
    result = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, {platform.platform()}", "threads": ns.threads, "steps": ns.steps,
              "repeats": ns.repeats, "batch": 1, "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after], "rows": rows}
    lines = ["| engine | ms/token | tok/s | vs best torch f32 |", "|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['ms_per_token']} | {1e3 / r['ms_per_token']:.1f} | {r['speedup_vs_torch']}x |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results"
    stem = "cpu-quant" if ns.model == "smollm2" else f"cpu-quant-{ns.model}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(
        f"# CPU decode of {ns.model}, batch 1 ({ns.threads} threads)\n\n`{result['command']}`\n\n"
        f"Machine: {result['machine']}; "
        f"load average before {result['load_average_before']}, after {result['load_average_after']}.\n\n"
        f"{table}\n")


if __name__ == "__main__":
    sys.exit(main())
