"""Where a batch-1 decode step's time goes, kernel by kernel, measured in isolation by Nsight Compute (each kernel
replayed alone with cold caches: its own time, without the launch gaps and PDL overlap of the graph).

    ncu --graph-profiling node --profile-from-start off --clock-control none --csv --page raw \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size,launch__registers_per_thread \
        python3 benchmarks/h200/ncu_step.py --layers 4 --quantization int4 > out.csv
    python3 benchmarks/h200/ncu_step.py --summarize out.csv      # per kernel name: count, us, GB/s; per layer

The script loads the Qwen3-30B-A3B shape with `--layers` layers (random weights), captures the bucket-1 decode graph
through a short decode, then replays it once between cudaProfilerStart/Stop: ncu sees exactly one step's kernels.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step(layers: int, quantization: str, batch: int) -> None:
    import torch
    from engine_gpu import QWEN3_30B_A3B, time_decode

    from moemesh.runtime.engine import Engine

    model_dir = Path(tempfile.mkdtemp(prefix="ncu-"))
    (model_dir / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "num_hidden_layers": layers}))
    engine = Engine.load(model_dir, load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_memory_bytes=2**30,
                         max_context=256, quantization=quantization)
    time_decode(engine, batch, 128, 4, 2)  # captures the graph of this bucket
    graph = engine.decode.graphs[batch][0]
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    graph.replay()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def summarize(path: Path, layers: int) -> None:
    rows = list(csv.DictReader(l for l in path.open() if l.startswith('"')))
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(rows[0].get("gpu__time_duration.sum"), 1e-3)
    scale_b = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(rows[0].get("dram__bytes_read.sum"), 1)
    rows = [dict(r, us=float(r["gpu__time_duration.sum"].replace(",", "")) * scale,
                 nbytes=float((r.get("dram__bytes_read.sum") or "0").replace(",", "")) * scale_b)
            for r in rows[1:] if r.get("Kernel Name")]
    by_name = defaultdict(list)
    for r in rows:
        by_name[r["Kernel Name"][:60]].append(r)
    total = 0.0
    print("| kernel | count | us each (median) | us per layer | GB/s | grid | regs |\n|---|---|---|---|---|---|---|")
    for name, rs in sorted(by_name.items(), key=lambda kv: -sum(r["us"] for r in kv[1])):
        us = sorted(r["us"] for r in rs)
        nbytes = sum(r["nbytes"] for r in rs)
        total += sum(us)
        print(f"| {name} | {len(rs)} | {us[len(us) // 2]:.2f} | {sum(us) / layers:.2f} | "
              f"{nbytes / sum(us) / 1e3:.0f} | {rs[0].get('launch__grid_size')} | "
              f"{rs[0].get('launch__registers_per_thread')} |")
    print(f"\nsum of isolated kernel times: {total:.1f} us ({total / layers:.2f} us per layer, {layers} layers)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quantization", default="none")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--summarize", type=Path, default=None, help="ncu --csv --page raw output to summarize")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.layers)
    else:
        step(args.layers, args.quantization, args.batch)


if __name__ == "__main__":
    main()
