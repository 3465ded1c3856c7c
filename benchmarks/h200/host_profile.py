"""Where the host time of a decode step goes (cProfile of Engine.step at one batch size, Qwen3-30B-A3B shape with few
layers: host work is per sequence, not per layer). Prints the top functions by own time.

    PYTHONPATH=. python3 benchmarks/h200/host_profile.py --layers 4 --batch 64
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_gpu import QWEN3_30B_A3B  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.types import SequenceWork

    model = Path(tempfile.mkdtemp())
    (model / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "num_hidden_layers": args.layers}))
    engine = Engine.load(model, load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_memory_bytes=2**30,
                         max_context=512)
    ids = torch.randint(0, 151936, (args.batch, 128)).tolist()
    seqs = [f"s{i}" for i in range(args.batch)]
    results = engine.step([SequenceWork(s, q, 0) for s, q in zip(seqs, ids)])
    pos = 128
    for _ in range(3):
        results = engine.step([SequenceWork(s, [r.token_id], pos) for s, r in zip(seqs, results)])
        pos += 1
    prof = cProfile.Profile()
    started = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        results = engine.step([SequenceWork(s, [r.token_id], pos) for s, r in zip(seqs, results)])
        pos += 1
    prof.disable()
    ms = (time.perf_counter() - started) / args.steps * 1e3
    graph, _ = engine.decode.graphs[args.batch]
    import triton

    replay = triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median")
    print(f"batch {args.batch}, {args.layers} layers: {ms:.2f} ms/step (profiled), graph replay {replay:.2f} ms")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue()[:9000])


if __name__ == "__main__":
    main()
