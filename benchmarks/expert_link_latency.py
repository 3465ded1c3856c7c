"""Per-layer round trip of the router's expert data planes on this machine: shm, torch.distributed (dist: gloo on
CPUs, NCCL on GPUs), grpc.

    python benchmarks/expert_link_latency.py [--hidden 576] [--tokens 1,8,64] [--iters 200]
    python benchmarks/expert_link_latency.py --device cuda --modes dist --hidden 2048 --experts 128 --top-k 8 \
        --tokens 1,64,256 --shards 1 --out benchmarks/results/expert-link-nccl-h200   # two GPUs: router 0, shard 1

--shards expert shard processes (default 2; `python -m services.expert`, 1 compute thread each) of a small random
MoE checkpoint (hidden H, E experts top-K, expert FFN 16 wide, so the experts' compute is small next to the
transport); the router side is ShmDispatch.start(mode) in this process, timed around dispatch(layer, hidden [T, H],
ids, weights): post to every shard, each computes, the replies summed. On CUDA the router's tensors live on cuda:0,
the shards (bf16) on --shard-gpu (NCCL takes one rank per GPU: on two GPUs, --shards 1), every call is
synchronised, and the same experts' forward in this process (ExpertBank on cuda:0, shard by shard) is timed too:
round trip minus it = what the data plane adds per layer (dispatch, combine, the shard's request handling). Median
and p90 microseconds per layer over `iters` calls after 20 warm-up calls. Writes OUT.json and .md (machine, load
average, command).
"""

from __future__ import annotations

import argparse
import functools
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


def checkpoint(out: Path, hidden: int, experts: int, top_k: int) -> Path:
    """A 2-layer random MoE checkpoint (config.json + safetensors; no tokenizer: shards do not read one)."""
    from safetensors.numpy import save_file

    from moemesh.builtin.tiny import MOE_ARCH, tiny_config, tiny_weights

    config = tiny_config(MOE_ARCH, num_experts=experts, top_k=top_k, hidden=hidden, layers=2, heads=hidden // 64,
                         kv_heads=max(1, hidden // 256), intermediate=64, moe_intermediate=16,
                         shared_expert_intermediate=0, router_weighting="softmax")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tiny_weights(config, 0), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def start_shards(model: Path, home: Path, device: str, shard_gpu: str,
                 shards: int) -> tuple[list[subprocess.Popen], list[str]]:
    from mesh_process import free_port

    procs, addrs = [], []
    for index in range(shards):
        port = free_port()
        env = {**os.environ, "MOEMESH_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE"}
        extra = []
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = shard_gpu
            extra = ["--device", "cuda", "--dtype", "bfloat16"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "services.expert", "--model", str(model), "--port", str(port), "--shard-index",
             str(index), "--num-shards", str(shards), "--compute-threads", "1", "--metrics-port", "-1", *extra],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(home / f"shard{index}.log").open("w")))
        addrs.append(f"127.0.0.1:{port}")
    return procs, addrs


def progress(what: str) -> None:
    """A line per stage (NCCL formation, shard start-up can wait long on a new machine): seconds since start."""
    print(f"[{time.monotonic() - STARTED:7.1f} s] {what}", flush=True)


STARTED = time.monotonic()


def timed(call, iters: int, sync) -> list[float]:
    """Microseconds of each of `iters` calls after 20 warm-up calls, sorted."""
    times = []
    for i in range(iters + 20):
        start = time.perf_counter()
        call(i)
        sync()
        if i >= 20:
            times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)


@functools.lru_cache(maxsize=None)
def shard_banks(model: Path, num_experts: int, shards: int, device: str, dtype) -> tuple:
    """The shards' ExpertBanks in this process, loaded once per run (every token count times the same experts)."""
    from moemesh.runtime.experts import ExpertBank, shard_experts

    return tuple(ExpertBank.load(model, experts=shard_experts(num_experts, shards, i), device=device, dtype=dtype)
                 for i in range(shards))


def local_compute_us(model: Path, num_experts: int, shards: int, x, ids, weights, iters: int) -> float:
    """Median us of the shards' experts run in this process on x's device, one shard's after the other's."""
    import torch

    halves = shard_banks(model, num_experts, shards, str(x.device), x.dtype)

    def both(i: int) -> None:
        for bank in halves:
            bank.forward(i % 2, x, ids, weights)
    return statistics.median(timed(both, iters, torch.cuda.synchronize if x.is_cuda else lambda: None))


def measure(addrs: list[str], mode: str, args, tokens: int, model: Path) -> dict:
    import torch

    from services.router.expert_client import GrpcShardClient
    from services.router.placement import Placement
    from services.router.shm_dispatch import ShmDispatch

    cuda = args.device == "cuda"
    clients = [GrpcShardClient(a, connect_timeout=120) for a in addrs]
    placement = Placement(tuple(c.placement() for c in clients))
    progress(f"{mode}, {tokens} tokens: {len(clients)} shard(s) answer; forming the links")
    dispatch = ShmDispatch.start(clients, placement, args.experts, mode=mode, hidden_size=args.hidden,
                                 top_k=args.top_k, stall_timeout=5.0, call_timeout=60.0,
                                 device="cuda:0" if cuda else "cpu", join_timeout=60.0)
    progress(f"{mode}, {tokens} tokens: links {dispatch.transports()}; timing {args.iters} calls")
    device, dtype = ("cuda:0", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        x = torch.randn(tokens, args.hidden, device=device).to(dtype)  # [T, H]
        ids = torch.stack([torch.randperm(args.experts)[:args.top_k] for _ in range(tokens)]).to(device)  # [T, K]
        weights = torch.full((tokens, args.top_k), 1.0 / args.top_k, device=device)  # [T, K]
        dispatch.begin_step(tokens)
        times = timed(lambda i: dispatch(i % 2, x, ids, weights), args.iters, sync)
        dispatch.end_step()
        row = {"transport": dispatch.transports()[0], "tokens": tokens, "median_us": statistics.median(times),
               "p90_us": times[int(len(times) * 0.9)]}
    finally:
        dispatch.close()
        for client in clients:
            client.close()
    if cuda:  # the same experts in this process: what the round trip adds to them
        row["local_compute_us"] = local_compute_us(model, args.experts, args.shards, x, ids, weights, args.iters)
        row["data_plane_us"] = row["median_us"] - row["local_compute_us"]
    progress(f"{mode}, {tokens} tokens: {row}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tokens", default="1,8,64")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--modes", default="shm,dist,grpc")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shard-gpu", default="1", help="cuda: CUDA_VISIBLE_DEVICES of the shards")
    parser.add_argument("--shards", type=int, default=2, help="expert shard processes (NCCL: one rank per GPU, so "
                        "on two GPUs one shard beside the router)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "expert-link-latency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = checkpoint(Path(tmp) / "model", args.hidden, args.experts, args.top_k)
        progress(f"checkpoint written; starting {args.shards} shard(s)")
        procs, addrs = start_shards(model, Path(tmp), args.device, args.shard_gpu, args.shards)
        try:
            rows = [measure(addrs, mode, args, int(t), model)
                    for mode in args.modes.split(",") for t in args.tokens.split(",")]
        except Exception:
            for i in range(args.shards):
                print(f"shard {i} log:\n" + (Path(tmp) / f"shard{i}.log").read_text()[-2000:])
            raise
        finally:
            for proc in procs:
                proc.kill()
    lines = ["| transport | T | median us/layer | p90 us/layer | same experts in-process us | data plane us |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['transport']} | {r['tokens']} | {r['median_us']:.0f} | {r['p90_us']:.0f} | "
              f"{r.get('local_compute_us', float('nan')):.0f} | {r.get('data_plane_us', float('nan')):.0f} |"
              for r in rows]
    print("\n".join(lines))
    meta = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
            "load_average": os.getloadavg(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k, "device": args.device}
    if args.device == "cuda":
        import torch

        meta["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# Expert data plane, per-layer round trip\n\n{json.dumps(meta)}\n\n"
                                      + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
