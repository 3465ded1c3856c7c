"""What each part of a batch-1 decode step costs inside the CUDA graph: the step's graph replay with one part removed
(its kernels not launched, outputs left as uninitialised buffers), recaptured, beside the whole step.

    Engine.load(dummy, 48 layers) -> decode a few steps (bucket-1 graph) -> graph replay ms
    -> per ablation: patch the part's function to launch nothing -> recapture -> graph replay ms -> restore

Isolated kernel times (ncu, benchmarks/h200/ncu_step.py) overstate what a kernel costs the step: with programmatic
dependent launch a GEMV streams its weights before it waits on the kernel before it, so part of its time hides
behind that kernel. Removing the part from the graph measures what the step would gain if that part were free; the
`... at 1/4 bytes` rows run the same bf16 kernels over a quarter of the weight rows (what int4 weights would read).
Values are garbage once a part is removed (random weights anyway); the routing still picks 8 experts per token.

    PYTHONPATH=. python3 benchmarks/h200/step_ablation.py --quantizations int4,none --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_gpu import QWEN3_30B_A3B, load, time_decode  # noqa: E402

from graph_timing import write_json  # noqa: E402


def _empty_linear(x, w, b=None, *rest, **kw):
    return torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)


def _empty_norm_linear(x, delta, nw, eps, w, b=None, *rest, **kw):
    return x, torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)


def _quarter(fn, split):
    """fn with its weight argument cut to its first quarter of rows; the output widened back by an empty buffer."""
    def run(*args, **kw):
        args = list(args)
        w = args[split]
        args[split] = w[: w.shape[0] // 4]
        out = fn(*args, **kw)
        y = out[-1] if isinstance(out, tuple) else out
        full = torch.empty(y.shape[0], w.shape[0], dtype=y.dtype, device=y.device)
        return (*out[:-1], full) if isinstance(out, tuple) else full
    return run


def _no_moe(self, h, dispatch, logits=None):
    return torch.empty_like(h)
    yield  # a generator, as MoeBlock.steps


def _no_logits(self, h):
    return torch.empty(h.shape[0], self.lm_head.shape[0], dtype=torch.float32, device=h.device)


def ablations() -> dict:
    """name -> list of (module or class, attribute, replacement)."""
    from moemesh.runtime import backbone
    from moemesh.runtime.gpu import decode_graphs, dense_gemv, fused_ops, norm_rope

    qkv = [(dense_gemv, "norm_linear", _empty_norm_linear)]
    o = [(dense_gemv, "linear", _empty_linear)]
    rope = [(norm_rope, "norm_rope_", lambda *a, **k: None)]
    attend = [(decode_graphs.DecodeContext, "read", lambda self, q, pools, scale: torch.empty_like(q))]
    head = [(backbone.Backbone, "logits", _no_logits)]
    return {
        "q/k/v GEMV (with its norm)": qkv,
        "o GEMV": o,
        "q/k/v + o GEMVs": qkv + o,
        "q/k/v + o GEMVs at 1/4 bytes": [(dense_gemv, "norm_linear", _quarter(dense_gemv.norm_linear, 4)),
                                         (dense_gemv, "linear", _quarter(dense_gemv.linear, 1))],
        "q/k norm + rope + KV write": rope,
        "attention (paged decode + combine)": attend,
        "router logits (with its norm)": [(fused_ops, "router_logits_norm",
                                           lambda x, a, nw, eps, gw: (x, x, torch.empty(
                                               x.shape[0], gw.shape[0], dtype=torch.float32, device=x.device)))],
        "routed experts (routing + MoE kernels)": [(backbone.MoeBlock, "steps", _no_moe)],
        "LM head": head,
        "everything but the MoE": qkv + o + rope + attend + head,
    }


@contextlib.contextmanager
def patched(changes):
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, new in changes:
        setattr(obj, name, new)
    try:
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def replay_ms(engine, args) -> float:
    """Recapture the bucket-1 graph under the current code and time its replay alone (median of 3 x do_bench)."""
    import statistics

    import triton

    engine.decode.graphs.clear()
    gc.collect()
    engine.decode.pool = torch.cuda.graph_pool_handle()  # the old graphs' pool cannot take a new capture
    time_decode(engine, 1, args.prompt, 4, 2)  # captures bucket 1 afresh
    graph = engine.decode.graphs[1][0]
    return statistics.median(triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
                             for _ in range(3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantizations", type=lambda s: s.split(","), default=["int4", "none"])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="ablation names (default: all)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.prompt, args.steps, args.kv_gib, args.kv_cache_dtype = 128, 8, 4, "auto"
    args.model_label = "Qwen3-30B-A3B shape"
    model_dir = Path(tempfile.mkdtemp(prefix="qwen3-dummy-"))
    (model_dir / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "num_hidden_layers": args.layers}))
    rows = []
    for quantization in args.quantizations:
        engine = load(args, model_dir, quantization)
        whole = replay_ms(engine, args)
        rows.append({"experts": quantization, "removed": "nothing", "ms": round(whole, 3), "saved_us_per_layer": 0.0})
        print(f"{quantization:5s} {'nothing removed':45s} {whole:7.3f} ms", flush=True)
        for name, changes in ablations().items():
            if args.only and name not in args.only:
                continue
            with patched(changes):
                ms = replay_ms(engine, args)
            saved = (whole - ms) * 1e3 / args.layers
            rows.append({"experts": quantization, "removed": name, "ms": round(ms, 3),
                         "saved_us_per_layer": round(saved, 2)})
            print(f"{quantization:5s} {name:45s} {ms:7.3f} ms  ({saved:+.2f} us per layer)", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    write_json(args.out / "step-ablation-h200.json", layers=args.layers, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
