"""Ping-pong micro-batches on the CPU mesh: `moemesh up` (2 expert shards over shared memory) with the router's split
on and off, streamed decode at several concurrencies.

    python benchmarks/pingpong_cpu.py [--model smollm2-moe] [--concurrency 8,16,64] [--tokens 48] [--repeats 2]

Per repeat: one mesh with MOEMESH_ROUTER_PINGPONG_MIN_SEQS=8 (on) and one with 0 (off), in alternating order
(on/off, then off/on: load from other work on the machine spreads over both); each mesh runs every concurrency in
turn (MOEMESH_BATCHER_MAX_BATCH_SIZE = the largest, so all streams share a step). A concurrency-c run: c
simultaneous StreamChatCompletion streams through the gateway (greedy, ignore_eos, --tokens tokens) after a warm-up
stream; a stream's ms/token = (last chunk - first chunk) / (tokens - 1) (benchmarks/mesh_decode.py), decode tok/s =
sum over streams of 1000 / ms/token. gain = median tok/s on / median tok/s off. The router log must say the split is
on (or off); the run fails otherwise. Writes benchmarks/results/pingpong-cpu.{json,md} with machine, command and
the load average around every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from mesh_decode import mesh_streams, start_mesh  # noqa: E402
from tests.mesh_process import stop_mesh  # noqa: E402

SWITCH = {"on": "8", "off": "0"}  # MOEMESH_ROUTER_PINGPONG_MIN_SEQS


def run_mesh(model: str, mode: str, concurrencies: list[int], tokens: int) -> dict[int, dict]:
    """One mesh with the split on or off; per concurrency: tok/s, median ms/token and the load average."""
    os.environ.update(MOEMESH_ROUTER_PINGPONG_MIN_SEQS=SWITCH[mode],
                      MOEMESH_BATCHER_MAX_BATCH_SIZE=str(max(concurrencies)))
    out = {}
    with tempfile.TemporaryDirectory(prefix="pingpong-") as tmp:
        proc, status = start_mesh(model, "shm", Path(tmp))
        try:
            router_log = (Path(tmp) / "home" / "logs" / "router.log").read_text()
            if f"ping-pong micro-batches {mode}" not in router_log:
                raise RuntimeError(f"the router did not switch ping-pong {mode}:\n{router_log[-2000:]}")
            transports = sorted({s.get("transport") for n, s in status["services"].items()
                                 if n.startswith("expert-")})
            for c in concurrencies:
                start = time.monotonic()
                per_stream = asyncio.run(mesh_streams(status["gateway"], c, tokens))
                out[c] = {"tok_s": sum(1000 / ms for ms in per_stream), "ms_per_token": statistics.median(per_stream),
                          "seconds": time.monotonic() - start, "load": os.getloadavg()[0], "transports": transports}
                print(f"  {mode} c={c}: {out[c]['tok_s']:.1f} tok/s, {out[c]['ms_per_token']:.0f} ms/token "
                      f"(load {out[c]['load']:.1f})", flush=True)
        finally:
            stop_mesh(proc)
    return out


def measure(args) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = {"on": {}, "off": {}}
    for rep in range(args.repeats):
        for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):
            print(f"repeat {rep + 1}/{args.repeats}, ping-pong {mode} (load {os.getloadavg()[0]:.1f})", flush=True)
            for c, row in run_mesh(args.model, mode, args.concurrency, args.tokens).items():
                runs[mode].setdefault(c, []).append(row)
    return runs


def report(runs: dict, args, load_start: float) -> tuple[dict, str]:
    table = ["| concurrency | off tok/s (runs) | on tok/s (runs) | gain on/off | off ms/token | on ms/token |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for c in args.concurrency:
        med = {m: statistics.median(r["tok_s"] for r in runs[m][c]) for m in ("on", "off")}
        ms = {m: statistics.median(r["ms_per_token"] for r in runs[m][c]) for m in ("on", "off")}
        gain = med["on"] / med["off"]
        summary[c] = {"tok_s": med, "ms_per_token": ms, "gain": gain, "runs": {m: runs[m][c] for m in runs}}
        each = {m: ", ".join(f"{r['tok_s']:.1f}" for r in runs[m][c]) for m in runs}
        table.append(f"| {c} | {med['off']:.1f} ({each['off']}) | {med['on']:.1f} ({each['on']}) | {gain:.2f}x | "
                     f"{ms['off']:.0f} | {ms['on']:.0f} |")
    import torch

    loads = [r["load"] for m in runs for c in runs[m] for r in runs[m][c]]
    machine = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
               "load_average_runs": [min(loads), max(loads)]}
    command = "python benchmarks/pingpong_cpu.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "pingpong_cpu", "model": args.model, "tokens": args.tokens, "machine": machine,
              "command": command, "results": {str(c): v for c, v in summary.items()}}
    md = "\n".join([
        f"# Ping-pong micro-batches on the CPU mesh ({args.model}, 2 expert shards over shm, {args.tokens} tokens)",
        "", f"Command: `{command}`  ",
        f"Machine: {machine['cpu_cores']} cores, {machine['platform']}, torch {machine['torch']}; load average "
        f"{load_start:.1f} at start, {machine['load_average_end']:.1f} at end, {min(loads):.1f}-{max(loads):.1f} "
        "during the runs (the machine is shared with other work).", "", *table, "",
        "tok/s: sum over the concurrent streams of 1000 / ms per token (decode pace each client sees; prefill "
        "excluded), median over repeats; on and off interleaved (on/off, then off/on). On: the router splits steps "
        "of >= 8 sequences into two micro-batches whose expert work at the shards overlaps the other's router work "
        "(moemesh/runtime/micro_batch.py).", ""])
    return result, md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-moe")
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[8, 16, 64])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pingpong-cpu")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    result, md = report(measure(args), args, load_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
