"""A prompt's tail after a prefix-cache hit, through the decode graphs (one row per token, paged decode attention)
against the eager prefill path (paged prefill attention), at the full Qwen3-30B-A3B shape (48 layers, random bf16).

    python3 benchmarks/h200/cached_tail.py [--prefix 4000] [--tails 64,128,200,250] [--repeats 5]

Why: steps of up to BUCKETS[-1] tokens replay the decode graphs, prefill rows included; each such row reads its
whole context through the block tables, where the prefill kernel reads it once per tile of queries. With the bucket
of 256 (decode_graphs.py) a tail of 129-256 tokens after a long cached prefix moved from the second path to the
first: this times both. Prints a table; writes benchmarks/results/cached-tail-h200.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", type=int, default=4000)
    p.add_argument("--tails", default="64,128,200,250")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from engine_gpu import QWEN3_30B_A3B
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.types import SequenceWork

    model_dir = Path(tempfile.mkdtemp(prefix="qwen3-dummy-"))
    (model_dir / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    engine = Engine.load(model_dir, load_format="dummy", device="cuda", dtype=torch.bfloat16,
                         kv_memory_bytes=8 * 2**30, max_context=args.prefix + 512, prefix_cache=True)
    prefix = [(7 * i) % 1000 + 3 for i in range(args.prefix)]
    engine.step([SequenceWork("warm", prefix, 0)])  # computes the prefix; its full blocks stay cacheable
    runner, rows, n = engine.decode, [], 0

    def tail_ms(tail: int, graphs: bool) -> float:
        nonlocal n
        engine.decode = runner if graphs else None
        times = []
        for _ in range(args.repeats + 1):
            n += 1
            work = SequenceWork(f"t{n}", prefix + [(n * 13 + j) % 900 + 5 for j in range(tail)], 0)
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = engine.step([work])[0]
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
            assert result.cached_tokens >= args.prefix - 16, result.cached_tokens
            engine.release([work.seq_id])
        return statistics.median(times[1:])

    for tail in (int(t) for t in args.tails.split(",")):
        graph, eager = tail_ms(tail, True), tail_ms(tail, False)
        rows.append({"prefix": args.prefix, "tail": tail, "graphs_ms": round(graph, 2),
                     "prefill_path_ms": round(eager, 2)})
        print(rows[-1], flush=True)
    table = "| cached prefix | tail tokens | decode graphs ms | prefill path ms |\n|---|---|---|---|\n" + "".join(
        f"| {r['prefix']} | {r['tail']} | {r['graphs_ms']} | {r['prefill_path_ms']} |\n" for r in rows)
    print(table)
    out = {"machine": torch.cuda.get_device_name(), "command": "python3 " + " ".join(sys.argv), "rows": rows}
    res = ROOT / "benchmarks" / "results"
    (res / "cached-tail-h200.json").write_text(json.dumps(out, indent=1) + "\n")
    (res / "cached-tail-h200.md").write_text(f"# Cached prompt tails: decode graphs vs the prefill path\n\n"
                                             f"{out['machine']}; `{out['command']}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
