"""The Engine on one GPU at the full Qwen3-30B-A3B shape (48 layers, random weights via load_format="dummy"), in bf16
and with weight-only quantized experts (`--quantizations none,fp8`: fp8 e4m3 per-channel; int8 and int4 (a scale
per 128 columns) also accepted: `--quantizations none,fp8,int4` adds int4 rows and the int4/bf16 speed-up).

    config.json written here -> Engine.load(load_format="dummy") on cuda -> per batch size: prefill `--prompt`
    tokens per sequence in one step, warm-up decode steps (CUDA graph capture), then `--steps` timed decode steps
    (wall clock around Engine.step, which ends with the one device-to-host copy of the sampled tokens)
    -> rows {model, layers, who, quantization, batch, ms_per_step, tok_s, roofline_ms}

who: "moemesh" (decode in CUDA graphs), "moemesh-eager" (same kernels, no graphs), "moemesh-before" (the path
before issue 10: gathered context + SDPA, sort + torch._grouped_mm with host syncs). roofline_ms = bytes a decode
step must read (weights of the experts a batch touches under uniform routing, attention, router, LM head, KV
cache) / 4.22 TB/s (FACTS.md's measured H200 copy bandwidth); with quantized experts their weights count 1 byte each
(int4: half a byte + a float32 scale per 128 weights, EXPERT_BYTES).

    PYTHONPATH=. python3 benchmarks/engine_gpu.py --out benchmarks/results        # on the H200, ~4 min
    PYTHONPATH=. python3 benchmarks/engine_gpu.py --transformers ...              # + transformers generate() rows

`--models qwen3,dsv2lite` adds DeepSeek-V2-Lite's shape (27 layers, MLA with kv_lora_rank 512, 64 routed + 2 shared
experts, top-6; decode attends over the latent, weight-absorbed: gpu/mla_decode.py); its roofline counts MLA's
latent KV bytes ((kv_lora_rank + rope dim) per token and layer) and its attention, shared-expert and dense-layer
weights. `--layers` defaults to each model's own depth.

`--kv-cache-dtype fp8` keeps the KV cache in e4m3 (its rows and roofline count one byte per cached value); with a long
`--prompt` (e.g. 4096 at batch 64) it shows what the cache's bytes cost a decode step. Prompts are prefilled in steps
of at most PREFILL_TOKENS tokens.
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
DEEPSEEK_V2_LITE = {  # deepseek-ai/DeepSeek-V2-Lite's config.json (the fields the runtime reads)
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "scoring_func": "softmax",
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840, "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "bos_token_id": 100000, "eos_token_id": 100001,
}
MODELS = {"qwen3": ("Qwen3-30B-A3B shape", QWEN3_30B_A3B), "dsv2lite": ("DeepSeek-V2-Lite shape", DEEPSEEK_V2_LITE)}
PREFILL_TOKENS = 16384  # a batch's prompts are prefilled in steps of whole prompts up to this many tokens
EXPERT_BYTES = {"bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5 + 4 / 128}  # per expert weight, scales included


def roofline_ms(spec, batch: int, context: float, expert_bytes: float = 2, kv_bytes: int = 2) -> float:
    a, m, h = spec.attention, spec.moe, spec.hidden_size
    attn = (2 * a.num_heads + 2 * a.num_kv_heads) * a.head_dim * h * 2
    kv = batch * context * 2 * a.num_kv_heads * a.head_dim * kv_bytes
    if a.mla:  # q (or q_a + q_b), kv_a, kv_b, o in bf16; the cache holds the latent + the rope key per token
        r, q = a.kv_lora_rank, a.num_heads * a.head_dim
        q_bytes = q * h if a.q_lora_rank is None else a.q_lora_rank * (h + q)
        attn = (q_bytes + (r + a.qk_rope_head_dim) * h + a.num_heads * (a.qk_nope_head_dim + a.v_head_dim) * r
                + a.num_heads * a.v_head_dim * h) * 2
        kv = batch * context * (r + a.qk_rope_head_dim) * 2
    touched = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** batch)
    experts = touched * 3 * m.intermediate_size * h * expert_bytes + 3 * m.shared_intermediate_size * h * 2
    per_layer = attn + m.num_experts * h * 4 + experts + kv + 4 * h * 2
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.num_layers))
    dense = (spec.num_layers - moe_layers) * (3 * spec.intermediate_size * h * 2 - m.num_experts * h * 4 - experts)
    return (spec.num_layers * per_layer + dense + spec.vocab_size * h * 2) / BANDWIDTH * 1e3


def time_decode(engine, batch: int, prompt: int, steps: int, warmup: int) -> float:
    """Median ms of `steps` decode steps of `batch` sequences after a prefill and `warmup` decode steps."""
    from moemesh.runtime.types import SequenceWork

    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, engine.spec.vocab_size, (batch, prompt), generator=gen).tolist()
    seqs = [f"b{batch}-{i}" for i in range(batch)]
    results = prefill(engine, seqs, ids)
    pos, times = prompt, []
    for step in range(warmup + steps):
        works = [SequenceWork(s, [r.token_id], pos) for s, r in zip(seqs, results)]
        started = time.perf_counter()
        results = engine.step(works)
        times.append(time.perf_counter() - started)
        pos += 1
    engine.release(seqs)
    return statistics.median(times[warmup:]) * 1e3


def prefill(engine, seqs: list[str], ids: list[list[int]]) -> list:
    """Each sequence's prompt in steps of whole prompts up to PREFILL_TOKENS tokens; the results in order."""
    from moemesh.runtime.types import SequenceWork

    per_step = max(1, PREFILL_TOKENS // len(ids[0]))
    return [r for i in range(0, len(seqs), per_step)
            for r in engine.step([SequenceWork(s, p, 0) for s, p in zip(seqs[i:i + per_step], ids[i:i + per_step])])]


def time_prefill(engine, prompt: int, repeats: int = 3) -> float:
    """Median ms of Engine.step on one new sequence of `prompt` tokens (its first token out: the time to first token
    on an idle engine), after one untimed prefill (kernel compilation)."""
    from moemesh.runtime.types import SequenceWork

    gen = torch.Generator().manual_seed(prompt)
    times = []
    for i in range(repeats + 1):
        ids = torch.randint(0, engine.spec.vocab_size, (prompt,), generator=gen).tolist()
        started = time.perf_counter()
        engine.step([SequenceWork(f"p{i}", ids, 0)])
        times.append(time.perf_counter() - started)
        engine.release([f"p{i}"])
    return statistics.median(times[1:]) * 1e3


def time_decode_ahead(engine, batch: int, prompt: int, steps: int, warmup: int) -> float:
    """Median ms between the finishes of consecutive decode steps, each launched before the previous one finished."""
    from moemesh.runtime.types import SequenceWork

    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, engine.spec.vocab_size, (batch, prompt), generator=gen).tolist()
    seqs = [f"a{batch}-{i}" for i in range(batch)]
    prefill(engine, seqs, ids)
    previous, times, last = None, [], time.perf_counter()
    for step in range(warmup + steps + 1):
        launched = engine.launch([SequenceWork(s, [], prompt + step, None, follows=True) for s in seqs], previous)
        assert launched is not None, "a plain decode step must launch ahead"
        if previous is not None:
            engine.finish(previous)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        previous = launched
    engine.finish(previous)
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
                         quantization=quantization, kv_cache_dtype=args.kv_cache_dtype)
    print(f"loaded {engine.spec.num_layers} layers of {args.model_label} ({quantization}, experts "
          f"{engine.dispatch.bank.weight_bytes / 1e9:.1f} GB) "
          f"in {time.perf_counter() - started:.0f} s; graphs: {engine.info.cuda_graphs}; KV cache "
          f"{engine.info.kv_cache_dtype}, {engine.info.kv_blocks_total} blocks", flush=True)
    return engine


def row(engine, args, who: str, label: str, batch: int, steps: int) -> dict:
    spec = engine.spec
    ms = time_decode(engine, batch, args.prompt, steps, args.warmup)
    from moemesh.runtime.gpu.decode_graphs import BUCKETS

    # launched ahead: only steps the decode runner takes (its buckets); a larger batch runs Engine.step alone
    pipelined = who == "moemesh" and engine.decode is not None and batch <= BUCKETS[-1]
    ahead = time_decode_ahead(engine, batch, args.prompt, steps, args.warmup) if pipelined else None
    context = args.prompt + args.warmup + steps / 2
    out = {"model": f"{args.model_label} (random weights)", "layers": spec.num_layers, "who": who,
           "quantization": label, "batch": batch, "ms_per_step": round(ms, 2), "tok_s": round(batch * 1e3 / ms, 1),
           "kv_cache_dtype": engine.info.kv_cache_dtype,
           "roofline_ms": round(roofline_ms(spec, batch, context, EXPERT_BYTES[label],
                                            1 if engine.info.kv_cache_dtype == "fp8" else 2), 2)}
    if ahead is not None:  # each step launched behind the previous one, as the router runs pipelined steps
        out["ms_per_step_ahead"] = round(ahead, 2)
    if batch == 1 and who == "moemesh":  # one prompt of --prompt tokens, alone
        out["prefill_ms"] = round(time_prefill(engine, args.prompt), 2)
    print(json.dumps(out), flush=True)
    return out


def speedups(rows: list[dict]) -> list[str]:
    """Lines 'int4 vs bf16: batch 1 1.62x, ...' (bf16 ms / quantized ms per step, moemesh rows of one model), for
    Engine.step and for steps launched ahead."""
    lines = []
    for key, how in (("ms_per_step", "Engine.step"), ("ms_per_step_ahead", "launched ahead")):
        ms = {(r["model"], r["quantization"], r["batch"]): r[key] for r in rows if r["who"] == "moemesh" and key in r}
        for model, label in sorted({(m, q) for m, q, _ in ms if q != "bf16"}):
            pairs = [f"batch {b} {ms[(m, 'bf16', b)] / t:.2f}x" for (m, q, b), t in sorted(ms.items())
                     if (m, q) == (model, label) and (m, "bf16", b) in ms]
            if pairs:
                lines.append(f"{model}: {label} vs bf16 decode speed-up ({how}): {', '.join(pairs)}")
    return lines


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


def transformers_rows(args, model_dir: Path, config: dict) -> list[dict]:
    """transformers' generate() at each batch size (benchmarks/transformers_baseline.py); the same roofline."""
    from moemesh.runtime.spec import load_spec
    from transformers_baseline import rows as baseline_rows

    spec = load_spec(model_dir)
    context = args.prompt + args.steps / 2
    config = {**config, "num_hidden_layers": spec.num_layers}
    return baseline_rows(config, args.model_label, args.batches, args.prompt, args.steps,
                         lambda batch: roofline_ms(spec, batch, context))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="default: each model's own depth")
    p.add_argument("--models", type=lambda s: s.split(","), default=["qwen3"], help=f"comma-separated: {list(MODELS)}")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 128])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kv-gib", type=int, default=4)
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"), help="what the KV cache stores")
    p.add_argument("--quantizations", type=lambda s: s.split(","), default=["none", "fp8"],
                   help="comma-separated: none (bf16 experts), fp8, int8, int4")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the eager and pre-issue-10 rows")
    p.add_argument("--transformers", action="store_true", help="add transformers generate() rows (same shape, "
                   "random bf16 weights, grouped_mm experts) to the table")
    p.add_argument("--profile", type=Path, default=None, help="folder for per-kernel profiles of graph replays")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    rows, replay = [], {}
    for name in args.models:  # one model at a time; rows say which
        args.model_label, config = MODELS[name]
        model_dir = Path(tempfile.mkdtemp(prefix=f"{name}-dummy-"))
        (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": args.layers or
                                                           config["num_hidden_layers"]}))
        model_rows, model_replay = run(args, model_dir)
        rows += model_rows
        if args.transformers:  # after the engine is freed: both at once would not fit (61 GB each in bf16)
            rows += transformers_rows(args, model_dir, config)
        replay.update({f"{name} {k}": v for k, v in model_replay.items()} if len(args.models) > 1 else model_replay)
    print(f"graph replay ms by bucket: {replay}", flush=True)
    meta = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "command": "PYTHONPATH=. python3 " + " ".join(sys.argv), "prompt": args.prompt, "steps": args.steps,
            "kv_cache_dtype": args.kv_cache_dtype,
            "graph_replay_ms": replay}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "engine-h200" if args.models == ["qwen3"] else "engine-h200-" + "-".join(args.models)
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Engine decode step, {', '.join(MODELS[n][0] for n in args.models)}, random weights", "",
             f"{meta['machine']}; prompt {args.prompt}, {args.steps} timed decode steps, KV cache "
             f"{args.kv_cache_dtype}; `{meta['command']}`", "",
             "| model | layers | who | experts | batch | ms/step | tok/s | roofline ms | ms/step launched ahead | "
             f"prefill ms ({args.prompt} tokens, alone) |", "|---" * 10 + "|"]
    lines += [f"| {r['model']} | {r['layers']} | {r['who']} | {r['quantization']} | {r['batch']} | "
              f"{r['ms_per_step']} | {r['tok_s']} | {r['roofline_ms']} | {r.get('ms_per_step_ahead', '-')} | "
              f"{r.get('prefill_ms', '-')} |" for r in rows]
    lines += ["", f"GPU time of one captured step (graph replay alone) by experts' dtype and bucket, ms: {replay}"]
    lines += speedups(rows)
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
