"""Per-layer round trip of the router's expert data planes on this machine (loopback): shm, gloo (dist), grpc.

    python benchmarks/expert_link_latency.py [--hidden 576] [--tokens 1,8,64] [--iters 200]

Two expert shard processes (`python -m services.expert`, 1 compute thread each) of a small random MoE checkpoint
(hidden H, 8 experts top-2, expert FFN 16 wide, so the experts' compute is small next to the transport); the router
side is ShmDispatch.start(mode) in this process, timed around dispatch(layer, hidden [T, H], ids, weights): post to
both shards, both compute, both replies summed. Median and p90 microseconds per layer over `iters` calls after 20
warm-up calls. Writes benchmarks/results/expert-link-latency.json and .md (machine, load average, command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def start_shards(model: Path, home: Path) -> tuple[list[subprocess.Popen], list[str]]:
    from mesh_process import free_port

    procs, addrs = [], []
    for index in (0, 1):
        port = free_port()
        env = {**os.environ, "MOEMESH_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "services.expert", "--model", str(model), "--port", str(port), "--shard-index",
             str(index), "--num-shards", "2", "--compute-threads", "1", "--metrics-port", "-1"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        addrs.append(f"127.0.0.1:{port}")
    return procs, addrs


def measure(addrs: list[str], mode: str, hidden: int, tokens: int, iters: int) -> dict:
    import torch

    from services.router.expert_client import GrpcShardClient
    from services.router.placement import Placement
    from services.router.shm_dispatch import ShmDispatch

    clients = [GrpcShardClient(a, connect_timeout=120) for a in addrs]
    placement = Placement(tuple(c.placement() for c in clients))
    dispatch = ShmDispatch.start(clients, placement, 8, mode=mode, hidden_size=hidden, top_k=2, stall_timeout=1.0,
                                 call_timeout=30.0)
    try:
        x = torch.randn(tokens, hidden)  # [T, H]
        ids = torch.randint(0, 8, (tokens, 2))  # [T, K]
        weights = torch.full((tokens, 2), 0.5)  # [T, K]
        times = []
        dispatch.begin_step(tokens)
        for i in range(iters + 20):
            start = time.perf_counter()
            dispatch(i % 2, x, ids, weights)
            if i >= 20:
                times.append((time.perf_counter() - start) * 1e6)
        dispatch.end_step()
        times.sort()
        return {"transport": dispatch.transports()[0], "tokens": tokens, "median_us": statistics.median(times),
                "p90_us": times[int(len(times) * 0.9)]}
    finally:
        dispatch.close()
        for client in clients:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tokens", default="1,8,64")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--modes", default="shm,dist,grpc")
    args = parser.parse_args()
    from moemesh.builtin.tiny import make_tiny_model
    from moemesh.home import models_dir

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", num_experts=8, top_k=2, hidden=args.hidden, layers=2,
                                heads=9, kv_heads=3, intermediate=64, moe_intermediate=16,
                                tokenizer_from=models_dir() / "smollm2")
        procs, addrs = start_shards(model, Path(tmp))
        try:
            rows = [measure(addrs, mode, args.hidden, int(t), args.iters)
                    for mode in args.modes.split(",") for t in args.tokens.split(",")]
        finally:
            for proc in procs:
                proc.kill()
    lines = ["| transport | T | median us/layer | p90 us/layer |", "|---|---|---|---|"]
    lines += [f"| {r['transport']} | {r['tokens']} | {r['median_us']:.0f} | {r['p90_us']:.0f} |" for r in rows]
    print("\n".join(lines))
    meta = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
            "load_average": os.getloadavg(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "hidden": args.hidden}
    out = ROOT / "benchmarks" / "results" / "expert-link-latency"
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# Expert data plane, per-layer round trip\n\n{json.dumps(meta)}\n\n"
                                      + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
