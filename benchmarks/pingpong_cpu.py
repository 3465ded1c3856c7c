"""Ping-pong micro-batches on the CPU mesh: `moemesh up` (2 expert shards over shared memory) with the router's split
on and off, streamed decode at several concurrencies.

    python benchmarks/pingpong_cpu.py [--model smollm2-moe] [--concurrency 8,16,64] [--tokens 48] [--repeats 2]

Two meshes run side by side for the whole benchmark: one with MOEMESH_ROUTER_PINGPONG_MIN_SEQS=8 (on), one with 0
(off); MOEMESH_BATCHER_MAX_BATCH_SIZE = the largest concurrency, so all streams share a step. Only one mesh is
driven at a time (the other waits in blocking receives), and the two are driven back to back per concurrency, in
alternating order (on/off, then off/on), so that each on/off pair is measured within a minute of load from other
work on the machine. A concurrency-c run: c simultaneous StreamChatCompletion streams through the gateway (greedy,
ignore_eos, --tokens tokens) after a warm-up stream; a stream's ms/token = (last chunk - first chunk) / (tokens - 1)
(benchmarks/mesh_decode.py), decode tok/s = sum over streams of 1000 / ms/token. gain = median tok/s on / median
tok/s off; the median of the per-pair ratios is given too. Each router's log must say the split is on (or off); the
run fails otherwise. Writes benchmarks/results/pingpong-cpu.{json,md} with machine, command and the load average
around every run.
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


def start(model: str, mode: str, concurrencies: list[int], workdir: Path) -> tuple[object, dict]:
    """A mesh with the split on or off (checked in the router's log); (process, status)."""
    os.environ.update(MOEMESH_ROUTER_PINGPONG_MIN_SEQS=SWITCH[mode],
                      MOEMESH_BATCHER_MAX_BATCH_SIZE=str(max(concurrencies)))
    proc, status = start_mesh(model, "shm", workdir)
    router_log = (workdir / "home" / "logs" / "router.log").read_text()
    if f"ping-pong micro-batches {mode}" not in router_log:
        stop_mesh(proc)
        raise RuntimeError(f"the router did not switch ping-pong {mode}:\n{router_log[-2000:]}")
    return proc, status


def cpu_seconds(status: dict) -> dict[str, float]:
    """CPU seconds (user + system) so far of the router and the expert shards (their pids in the status file)."""
    out = {}
    for name, service in status["services"].items():
        if name == "router" or name.startswith("expert-"):
            fields = Path(f"/proc/{service['pid']}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return out


def run(status: dict, mode: str, c: int, tokens: int) -> dict:
    start_s, cpu0 = time.monotonic(), cpu_seconds(status)
    per_stream = asyncio.run(mesh_streams(status["gateway"], c, tokens))
    cpu = {k: v - cpu0[k] for k, v in cpu_seconds(status).items()}
    # CPU ms per streamed token (prefill and the warm-up stream included): less sensitive to other load than wall time
    cpu_ms = {"router": cpu["router"] * 1000 / (c * tokens),
              "experts": sum(v for k, v in cpu.items() if k != "router") * 1000 / (c * tokens)}
    row = {"tok_s": sum(1000 / ms for ms in per_stream), "ms_per_token": statistics.median(per_stream),
           "cpu_ms_per_token": cpu_ms, "seconds": time.monotonic() - start_s, "load": os.getloadavg()[0],
           "transports": sorted({s.get("transport") for n, s in status["services"].items() if n.startswith("expert-")})}
    print(f"  {mode} c={c}: {row['tok_s']:.1f} tok/s, {row['ms_per_token']:.0f} ms/token, CPU ms/token router "
          f"{cpu_ms['router']:.1f} experts {cpu_ms['experts']:.1f} (load {row['load']:.1f})", flush=True)
    return row


def measure(args) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = {"on": {}, "off": {}}
    with tempfile.TemporaryDirectory(prefix="pingpong-") as tmp:
        meshes = {}
        try:
            for mode in ("on", "off"):
                (Path(tmp) / mode).mkdir()
                meshes[mode] = start(args.model, mode, args.concurrency, Path(tmp) / mode)
            for rep in range(args.repeats):
                print(f"repeat {rep + 1}/{args.repeats} (load {os.getloadavg()[0]:.1f})", flush=True)
                for i, c in enumerate(args.concurrency):
                    for mode in (("on", "off") if (rep + i) % 2 == 0 else ("off", "on")):
                        runs[mode].setdefault(c, []).append(run(meshes[mode][1], mode, c, args.tokens))
        finally:
            for proc, _ in meshes.values():
                stop_mesh(proc)
    return runs


def summarize(runs: dict, c: int) -> tuple[dict, str]:
    """Concurrency c's medians over repeats (tok/s, ms/token, CPU ms/token) and its table row."""
    med = {m: statistics.median(r["tok_s"] for r in runs[m][c]) for m in ("on", "off")}
    ms = {m: statistics.median(r["ms_per_token"] for r in runs[m][c]) for m in ("on", "off")}
    gain = med["on"] / med["off"]
    pairs = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(runs["on"][c], runs["off"][c]))
    cpu = {m: {part: statistics.median(r["cpu_ms_per_token"][part] for r in runs[m][c])
               for part in ("router", "experts")} for m in ("on", "off")}
    each = {m: ", ".join(f"{r['tok_s']:.1f}" for r in runs[m][c]) for m in runs}
    row = (f"| {c} | {med['off']:.1f} ({each['off']}) | {med['on']:.1f} ({each['on']}) | {gain:.2f}x | "
           f"{pairs:.2f}x | {ms['off']:.0f} | {ms['on']:.0f} | {cpu['off']['router']:.1f} + "
           f"{cpu['off']['experts']:.1f} | {cpu['on']['router']:.1f} + {cpu['on']['experts']:.1f} |")
    return {"tok_s": med, "ms_per_token": ms, "gain": gain, "median_pair_ratio": pairs, "cpu_ms_per_token": cpu,
            "runs": {m: runs[m][c] for m in runs}}, row


def report(runs: dict, args, load_start: float) -> tuple[dict, str]:
    table = ["| concurrency | off tok/s (runs) | on tok/s (runs) | gain on/off | median pair ratio | off ms/token | "
             "on ms/token | off CPU ms/token router + shards | on CPU ms/token router + shards |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for c in args.concurrency:
        summary[c], row = summarize(runs, c)
        table.append(row)
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
        "excluded), median over repeats; the two meshes run side by side and are driven in turn (on/off, then "
        "off/on; pair ratio: on / off of back-to-back runs). CPU ms/token: user + system CPU time of the router "
        "and of both shards per streamed token (prefill included), median over repeats: what the split costs in "
        "work, less sensitive to other load than the wall-clock rates. On: the router splits steps "
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
