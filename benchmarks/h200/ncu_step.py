"""Where a batch-1 decode step's time goes, kernel by kernel, measured in isolation by Nsight Compute (each kernel
replayed alone with cold caches: its own time, without the launch gaps and PDL overlap of the graph).

    ncu --graph-profiling node --profile-from-start off --clock-control none --csv --page raw \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size,launch__registers_per_thread \
        python3 benchmarks/h200/ncu_step.py --layers 4 --quantization int4 > out.csv
    python3 benchmarks/h200/ncu_step.py --summarize out.csv --layers 4 --quantization int4 \
        --out benchmarks/results/ncu-step-h200-int4     # per kernel name: count, us, GB/s, HBM limit; .md + .json

The script loads the Qwen3-30B-A3B shape with `--layers` layers (random weights), captures the bucket-1 decode graph
through a short decode, then replays it once between cudaProfilerStart/Stop: ncu sees exactly one step's kernels.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
BANDWIDTH = 4.22e12  # bytes/s, FACTS.md's measured H200 copy bandwidth


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


def summarize(path: Path, layers: int) -> list[dict]:
    """Per kernel name: count, median and per-layer us (isolated, cold caches), DRAM bytes read, and the HBM time of
    those bytes at 4.22 TB/s (FACTS.md's measured H200 copy bandwidth): the limit a kernel's own bytes allow."""
    rows = list(csv.DictReader(line for line in path.open() if line.startswith('"')))
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(rows[0].get("gpu__time_duration.sum"), 1e-3)
    scale_b = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(rows[0].get("dram__bytes_read.sum"), 1)
    by_name = defaultdict(list)
    for r in rows[1:]:
        if r.get("Kernel Name"):
            by_name[r["Kernel Name"][:60]].append(
                (float(r["gpu__time_duration.sum"].replace(",", "")) * scale,
                 float((r.get("dram__bytes_read.sum") or "0").replace(",", "")) * scale_b,
                 r.get("launch__grid_size"), r.get("launch__registers_per_thread")))
    table = []
    for name, ks in sorted(by_name.items(), key=lambda kv: -sum(k[0] for k in kv[1])):
        us = sorted(k[0] for k in ks)
        nbytes = sum(k[1] for k in ks)
        table.append({"kernel": name, "count": len(ks), "us_median": round(us[len(us) // 2], 2),
                      "us_per_layer": round(sum(us) / layers, 2), "gb_s": round(nbytes / sum(us) / 1e3),
                      "limit_us_per_layer": round(nbytes / BANDWIDTH * 1e6 / layers, 2),
                      "grid": ks[0][2], "regs": ks[0][3]})
    return table


def markdown(table: list[dict], layers: int) -> str:
    lines = ["| kernel | count | us each (median) | us per layer | HBM limit us per layer | GB/s | grid | regs |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['kernel']} | {t['count']} | {t['us_median']} | {t['us_per_layer']} | {t['limit_us_per_layer']} | "
              f"{t['gb_s']} | {t['grid']} | {t['regs']} |" for t in table]
    total = sum(t["us_per_layer"] for t in table)
    lines.append(f"\nsum of isolated kernel times: {total * layers:.1f} us ({total:.2f} us per layer, {layers} layers)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quantization", default="none")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--summarize", type=Path, default=None, help="ncu --csv --page raw output to summarize")
    p.add_argument("--out", type=Path, default=None, help="with --summarize: write OUT.json and OUT.md")
    p.add_argument("--machine", default=None, help="with --summarize: the machine the CSV came from")
    p.add_argument("--command", default=None, help="with --summarize: the ncu command that made the CSV")
    args = p.parse_args()
    if args.summarize:
        table = summarize(args.summarize, args.layers)
        text = markdown(table, args.layers)
        print(text)
        if args.out:
            meta = {"machine": args.machine or platform.node(), "command": args.command, "layers": args.layers,
                    "quantization": args.quantization, "batch": args.batch}
            args.out.with_suffix(".json").write_text(json.dumps({**meta, "kernels": table}, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(f"# Decode step kernels under Nsight Compute ({args.quantization}, "
                                                  f"batch {args.batch})\n\n{meta}\n\n{text}\n")
    else:
        step(args.layers, args.quantization, args.batch)


if __name__ == "__main__":
    main()
