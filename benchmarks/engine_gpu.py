"""The Engine on one GPU at the full Qwen3-30B-A3B shape (48 layers, random weights via load_format="dummy"), in bf16
and with weight-only quantized experts (`--quantizations none,fp8`: fp8 e4m3 per-channel; int8 also accepted).

    config.json written here -> Engine.load(load_format="dummy") on cuda -> per batch size: prefill `--prompt`
    tokens per sequence in one step, warm-up decode steps (CUDA graph capture), then `--steps` timed decode steps
    (wall clock around Engine.step, which ends with the one device-to-host copy of the sampled tokens)
    -> rows {model, layers, who, quantization, batch, ms_per_step, tok_s, roofline_ms}

who: "moemesh" (decode in CUDA graphs), "moemesh-eager" (same kernels, no graphs), "moemesh-before" (the path
before issue 10: gathered context + SDPA, sort + torch._grouped_mm with host syncs). roofline_ms = bytes a decode
step must read (weights of the experts a batch touches under uniform routing, attention, router, LM head, KV
cache) / 4.22 TB/s (FACTS.md's measured H200 copy bandwidth); with quantized experts their weights count 1 byte each.

    PYTHONPATH=. python3 benchmarks/engine_gpu.py --out benchmarks/results        # on the H200, ~4 min
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BANDWIDTH = 4.22e12
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
}


def roofline_ms(spec, batch: int, context: float, expert_bytes: int = 2) -> float:
    a, m, h = spec.attention, spec.moe, spec.hidden_size
    attn = (2 * a.num_heads + 2 * a.num_kv_heads) * a.head_dim * h * 2
    touched = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** batch)
    experts = touched * 3 * m.intermediate_size * h * expert_bytes
    kv = batch * context * 2 * a.num_kv_heads * a.head_dim * 2
    per_layer = attn + m.num_experts * h * 4 + experts + kv + 4 * h * 2
    return (spec.num_layers * per_layer + spec.vocab_size * h * 2) / BANDWIDTH * 1e3


def time_decode(engine, batch: int, prompt: int, steps: int, warmup: int) -> float:
    """Median ms of `steps` decode steps of `batch` sequences after a prefill and `warmup` decode steps."""
    from moemesh.runtime.types import SeqWork

    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, engine.spec.vocab_size, (batch, prompt), generator=gen).tolist()
    seqs = [f"b{batch}-{i}" for i in range(batch)]
    results = engine.step([SeqWork(s, p, 0) for s, p in zip(seqs, ids)])
    pos, times = prompt, []
    for step in range(warmup + steps):
        works = [SeqWork(s, [r.token_id], pos) for s, r in zip(seqs, results)]
        started = time.perf_counter()
        results = engine.step(works)
        times.append(time.perf_counter() - started)
        pos += 1
    engine.release(seqs)
    return statistics.median(times[warmup:]) * 1e3


def run(args, model_dir: Path) -> tuple[list[dict], dict]:
    """Rows of every quantization in turn (one engine at a time: 61 GB in bf16); the eager and pre-issue-10 rows
    only for bf16. Returns (rows, graph replay ms by quantization and bucket)."""
    rows, replay = [], {}
    for quantization in args.quantizations:
        engine = load(args, model_dir, quantization)
        label = "bf16" if quantization == "none" else quantization
        for batch in args.batches:
            rows.append(row(engine, args, "moemesh", label, batch, args.steps))
        replay[label] = replay_ms(engine)
        if args.profile:
            profile_replays(engine, label, args.profile)
        if quantization == "none" and args.baselines:
            engine.decode.graphs_on = False
            for batch in (1, 64):
                rows.append(row(engine, args, "moemesh-eager", label, batch, args.steps))
            engine.decode, engine.dispatch.bank.fused_off = None, "benchmark: the path before issue 10"
            for batch in (1, 64):
                rows.append(row(engine, args, "moemesh-before", label, batch, 8))
        del engine
        gc.collect()  # the engine's graphs and pools go before the next one loads
        torch.cuda.empty_cache()
    return rows, replay


def load(args, model_dir: Path, quantization: str):
    from moemesh.runtime.engine import Engine

    started = time.perf_counter()
    engine = Engine.load(model_dir, load_format="dummy", device="cuda", dtype=torch.bfloat16,
                         kv_memory_bytes=args.kv_gib * 2**30, max_context=args.prompt + args.steps + 64,
                         quantization=quantization)
    print(f"loaded {args.layers} layers ({quantization}, experts {engine.dispatch.bank.weight_bytes / 1e9:.1f} GB) "
          f"in {time.perf_counter() - started:.0f} s; graphs: {engine.info.cuda_graphs}", flush=True)
    return engine


def row(engine, args, who: str, label: str, batch: int, steps: int) -> dict:
    spec = engine.spec
    ms = time_decode(engine, batch, args.prompt, steps, args.warmup)
    context = args.prompt + args.warmup + steps / 2
    out = {"model": "Qwen3-30B-A3B shape (random weights)", "layers": spec.num_layers, "who": who,
           "quantization": label, "batch": batch, "ms_per_step": round(ms, 2), "tok_s": round(batch * 1e3 / ms, 1),
           "roofline_ms": round(roofline_ms(spec, batch, context, 2 if label == "bf16" else 1), 2)}
    print(json.dumps(out), flush=True)
    return out


def replay_ms(engine) -> dict[int, float]:
    """GPU time of one captured decode step (graph replay alone, no host work): step time minus this is host."""
    import triton

    return {b: round(triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median"), 2)
            for b, (graph, _) in sorted(engine.decode.graphs.items())}


def profile_replays(engine, label: str, out: Path) -> None:
    """Per-kernel GPU time of 5 replays of the bucket-1 and bucket-64 graphs (the torch profiler sees kernels inside
    graphs), to out/profile-<label>.txt: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    text = []
    for b in (1, 64):
        graph = engine.decode.graphs.get(b, (None,))[0]
        if graph is None:
            continue
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    graph.replay()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        except Exception as exc:  # a profiler without graph support must not cost the benchmark
            table = f"profiler failed: {type(exc).__name__}: {exc}"
        text.append(f"## {label}, bucket {b}, 5 graph replays\n{table}")
    (out / f"profile-{label}.txt").write_text("\n".join(text) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 128])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kv-gib", type=int, default=4)
    p.add_argument("--quantizations", type=lambda s: s.split(","), default=["none", "fp8"],
                   help="comma-separated: none (bf16 experts), fp8, int8")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the eager and pre-issue-10 rows")
    p.add_argument("--profile", type=Path, default=None, help="folder for per-kernel profiles of graph replays")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    model_dir = Path(tempfile.mkdtemp(prefix="qwen3-30b-a3b-dummy-"))
    (model_dir / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "num_hidden_layers": args.layers}))
    rows, replay = run(args, model_dir)
    print(f"graph replay ms by bucket: {replay}", flush=True)
    meta = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "command": "PYTHONPATH=. python3 " + " ".join(sys.argv), "prompt": args.prompt, "steps": args.steps,
            "graph_replay_ms": replay}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine-h200.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Engine decode step, Qwen3-30B-A3B shape, {args.layers} layers, random weights", "",
             f"{meta['machine']}; prompt {args.prompt}, {args.steps} timed decode steps; `{meta['command']}`", "",
             "| who | experts | batch | ms/step | tok/s | roofline ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['who']} | {r['quantization']} | {r['batch']} | {r['ms_per_step']} | {r['tok_s']} | "
              f"{r['roofline_ms']} |" for r in rows]
    lines += ["", f"GPU time of one captured step (graph replay alone) by experts' dtype and bucket, ms: {replay}"]
    (args.out / "engine-h200.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
