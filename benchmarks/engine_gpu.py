"""The Engine on one GPU at the full Qwen3-30B-A3B shape (48 layers, random bf16 weights via load_format="dummy").

    config.json written here -> Engine.load(load_format="dummy") on cuda -> per batch size: prefill `--prompt`
    tokens per sequence in one step, warm-up decode steps (CUDA graph capture), then `--steps` timed decode steps
    (wall clock around Engine.step, which ends with the one device-to-host copy of the sampled tokens)
    -> rows {model, layers, who, quantization, batch, ms_per_step, tok_s, roofline_ms}

who: "moemesh" (decode in CUDA graphs), "moemesh-eager" (same kernels, no graphs), "moemesh-before" (the path
before issue 10: gathered context + SDPA, sort + torch._grouped_mm with host syncs). roofline_ms = bytes a decode
step must read (weights of the experts a batch touches under uniform routing, attention, router, LM head, KV
cache) / 4.22 TB/s (FACTS.md's measured H200 copy bandwidth).

    PYTHONPATH=. python3 benchmarks/engine_gpu.py --out benchmarks/results        # on the H200, ~4 min
"""

from __future__ import annotations

import argparse
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


def roofline_ms(spec, batch: int, context: float) -> float:
    a, m, h = spec.attention, spec.moe, spec.hidden_size
    attn = (2 * a.num_heads + 2 * a.num_kv_heads) * a.head_dim * h * 2
    experts = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** batch) * 3 * m.intermediate_size * h * 2
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


def run(args, model_dir: Path) -> list[dict]:
    from moemesh.runtime.engine import Engine

    started = time.perf_counter()
    engine = Engine.load(model_dir, load_format="dummy", device="cuda", dtype=torch.bfloat16,
                         kv_memory_bytes=args.kv_gib * 2**30, max_context=args.prompt + args.steps + 64)
    print(f"loaded {args.layers} layers in {time.perf_counter() - started:.0f} s; graphs: "
          f"{engine.info.cuda_graphs}", flush=True)
    spec, rows = engine.spec, []

    def row(who: str, batch: int, steps: int) -> None:
        ms = time_decode(engine, batch, args.prompt, steps, args.warmup)
        context = args.prompt + args.warmup + steps / 2
        rows.append({"model": "Qwen3-30B-A3B shape (random bf16)", "layers": spec.num_layers, "who": who,
                     "quantization": "bf16", "batch": batch, "ms_per_step": round(ms, 2),
                     "tok_s": round(batch * 1e3 / ms, 1), "roofline_ms": round(roofline_ms(spec, batch, context), 2)})
        print(json.dumps(rows[-1]), flush=True)

    for batch in args.batches:
        row("moemesh", batch, args.steps)
    replay = replay_ms(engine)
    engine.decode.graphs_on = False
    for batch in (1, 64):
        row("moemesh-eager", batch, args.steps)
    engine.decode, engine.dispatch.bank.fused_off = None, "benchmark: the path before issue 10"
    for batch in (1, 64):
        row("moemesh-before", batch, 8)
    return rows, replay


def replay_ms(engine) -> dict[int, float]:
    """GPU time of one captured decode step (graph replay alone, no host work): step time minus this is host."""
    import triton

    return {b: round(triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median"), 2)
            for b, (graph, _) in sorted(engine.decode.graphs.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 128])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kv-gib", type=int, default=4)
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
    lines = [f"# Engine decode step, Qwen3-30B-A3B shape, {args.layers} layers, random bf16", "",
             f"{meta['machine']}; prompt {args.prompt}, {args.steps} timed decode steps; `{meta['command']}`", "",
             "| who | batch | ms/step | tok/s | roofline ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['who']} | {r['batch']} | {r['ms_per_step']} | {r['tok_s']} | {r['roofline_ms']} |" for r in rows]
    lines += ["", f"GPU time of one captured step (graph replay alone) by bucket, ms: {replay}"]
    (args.out / "engine-h200.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
