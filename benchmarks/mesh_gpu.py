"""The mesh on one GPU against the in-process Engine: Qwen3-30B-A3B shape, random bf16 (load_format dummy),
concurrency 64 decode throughput.

    inproc     Engine.load in this process; median decode step of 64 sequences (benchmarks/engine_gpu.time_decode)
    inproc-ahead  the same engine, each step launched behind the previous one (Engine.launch / finish, as the router
               does with the batcher's pipelined steps: runtime/step_ahead.py); median time between two finishes
    colocated  router process (experts in its own ExpertBank: fused MoE + CUDA graphs) + batcher process
    ipc-N      N expert shard processes on the same GPU + router (transport cuda_ipc) + batcher process
    ipc-N-pp   ipc-N with ping-pong micro-batches (MOEMESH_ROUTER_PINGPONG_MIN_SEQS=8: steps of >= 8 sequences
               split in two halves over two cuda_ipc links per shard, moemesh/runtime/micro_batch.py; the split
               steps are captured in the decode runner's own CUDA graphs); ipc-N has ping-pong off

The mesh variants are driven through Batcher.Generate over gRPC (no gateway, tokenizer or metering: synthetic
prompt ids): 64 concurrent requests of --prompt random tokens and --max-tokens generated tokens (ignore_eos), after
a short warm-up round (CUDA graph capture). Decode tok/s = tokens streamed inside the window in which all 64
requests are decoding (after the last first token, before the first request ends) / the window.

    PYTHONPATH=. python3 benchmarks/mesh_gpu.py --out benchmarks/results     # on the H200
    PYTHONPATH=. python3 benchmarks/mesh_gpu.py --variants ipc-1,ipc-1-pp,ipc-2,ipc-2-pp --out /tmp/pp  # ping-pong
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_gpu import QWEN3_30B_A3B, time_decode, time_decode_ahead  # noqa: E402

T0 = time.monotonic()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(module: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module], env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=False)


def wait_serving(address: str, service: str, procs: list, timeout: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited while starting ({[p.poll() for p in procs]})")
        with grpc.insecure_channel(address) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"{service} at {address} not SERVING after {timeout} s")


def generate_all(address: str, n: int, prompt: int, max_tokens: int, vocab: int, seed: int) -> list[list[float]]:
    """n concurrent Generate streams; per request the arrival time of every token."""
    from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2

    rng = random.Random(seed)
    channel = grpc.insecure_channel(address, options=[("grpc.max_concurrent_streams", 1000)])
    stub = batcher_pb2_grpc.BatcherStub(channel)

    def one(i: int) -> list[float]:
        request = batcher_pb2.GenerateRequest(
            request_id=f"r{seed}-{i}", tenant="bench", prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        times = []
        for event in stub.Generate(request, timeout=300):
            times += [time.perf_counter()] * len(event.token_ids)
        return times

    with cf.ThreadPoolExecutor(n) as pool:
        out = list(pool.map(one, range(n)))
    channel.close()
    return out


def decode_rate(times: list[list[float]]) -> tuple[float, float, int]:
    """(decode tok/s in the all-decoding window, overall output tok/s, tokens)."""
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    inside = sum(1 for t in times for x in t if start < x <= end)
    first, last = min(t[0] for t in times), max(t[-1] for t in times)
    total = sum(len(t) for t in times)
    return (inside / (end - start) if end > start else 0.0), total / (last - first), total


def router_info(address: str) -> dict:
    from moemesh.v1 import router_pb2, router_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        info = router_pb2_grpc.RouterStub(ch).Info(router_pb2.RouterInfoRequest(), timeout=10)
    return {"transports": [p.transport for p in info.placement], "device": info.device}


def step_spans(home: Path, since_ns: int) -> dict:
    """--trace: medians over the router's router.step spans (the engine step on its engine thread) after since_ns:
    their length and the gap between one's end and the next one's start (engine thread outside Engine.step)."""
    spans = [json.loads(line) for line in (home / "traces" / "router.jsonl").read_text().splitlines()]
    steps = sorted((s["start"], s["end"]) for s in spans if s["name"] == "router.step" and s["start"] >= since_ns)
    busy = [(e - s) / 1e6 for s, e in steps]
    gaps = [(b[0] - a[1]) / 1e6 for a, b in zip(steps, steps[1:])]
    med = lambda xs: round(sorted(xs)[len(xs) // 2], 3) if xs else None  # noqa: E731
    return {"traced_steps": len(steps), "router_step_ms": med(busy), "router_gap_ms": med(gaps),
            "router_gap_mean_ms": round(sum(gaps) / len(gaps), 3) if gaps else None}


def run_mesh(args, model_dir: Path, shards: int, logs: Path, pingpong: bool = False) -> dict:
    tag = f"{shards}-pp" if pingpong else f"{shards}"  # log names per variant
    home = logs / f"home-{tag}"
    common = {"MOEMESH_MODEL": str(model_dir), "OTEL_SDK_DISABLED": "true"}
    if args.trace:  # every step sampled, spans appended to home/traces/<service>.jsonl
        common = {"MOEMESH_MODEL": str(model_dir), "MOEMESH_HOME": str(home), "MOEMESH_BATCHER_TRACE_EVERY": "1"}
    procs, addrs = [], []
    try:
        for i in range(shards):
            port = free_port()
            addrs.append(f"127.0.0.1:{port}")
            procs.append(start("services.expert", {**common, "MOEMESH_EXPERT_PORT": str(port),
                               "MOEMESH_EXPERT_DEVICE": "cuda", "MOEMESH_EXPERT_DTYPE": "bfloat16",
                               "MOEMESH_EXPERT_LOAD_FORMAT": "dummy", "MOEMESH_EXPERT_NUM_SHARDS": str(shards),
                               "MOEMESH_EXPERT_SHARD_INDEX": str(i)}, logs / f"expert-{tag}-{i}.log"))
        rport, bport = free_port(), free_port()
        procs.append(start("services.router", {
            **common, "MOEMESH_ROUTER_PORT": str(rport), "EXPERT_ADDRS": ",".join(addrs),
            "MOEMESH_ROUTER_DEVICE": "cuda", "MOEMESH_ROUTER_DTYPE": "bfloat16", "MOEMESH_ROUTER_LOAD_FORMAT": "dummy",
            "MOEMESH_ROUTER_KV_MEMORY_MB": str(args.kv_gib * 1024), "MOEMESH_ROUTER_MAX_CONTEXT": "1024",
            "MOEMESH_ROUTER_EXPERT_TRANSPORT": "cuda_ipc" if shards else "auto",
            "MOEMESH_ROUTER_PINGPONG_MIN_SEQS": "8" if pingpong else "0"}, logs / f"router-{tag}.log"))
        procs.append(start("services.batcher", {
            **common, "MOEMESH_BATCHER_PORT": str(bport), "ROUTER_ADDR": f"127.0.0.1:{rport}",
            "MOEMESH_BATCHER_MAX_BATCH_SIZE": str(args.concurrency), "MOEMESH_BATCHER_MAX_STEP_TOKENS": "4096"},
            logs / f"batcher-{tag}.log"))
        wait_serving(f"127.0.0.1:{rport}", "moemesh.v1.Router", procs, 300)
        wait_serving(f"127.0.0.1:{bport}", "moemesh.v1.Batcher", procs, 120)
        info = router_info(f"127.0.0.1:{rport}")
        generate_all(f"127.0.0.1:{bport}", args.concurrency, args.prompt, 8, QWEN3_30B_A3B["vocab_size"], 1)
        since = time.time_ns()
        times = generate_all(f"127.0.0.1:{bport}", args.concurrency, args.prompt, args.max_tokens,
                             QWEN3_30B_A3B["vocab_size"], 2)
        rate, overall, total = decode_rate(times)
        if args.trace:
            time.sleep(2)  # the span processors flush every 0.2 s
            info.update(step_spans(home, since))
        # The router's own word on the split ("ping-pong micro-batches on: ..." or "... off: why").
        said = [line[line.index("ping-pong"):] for line in (logs / f"router-{tag}.log").read_text().splitlines()
                if "ping-pong micro-batches" in line]
        return {"decode_tok_s": round(rate, 1), "output_tok_s": round(overall, 1), "tokens": total, **info,
                "pingpong": said[-1] if said else "?"}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run_inproc(args, model_dir: Path, ahead: bool = False) -> dict:
    from moemesh.runtime.engine import Engine

    engine = Engine.load(model_dir, load_format="dummy", device="cuda", dtype=torch.bfloat16,
                         kv_memory_bytes=args.kv_gib * 2**30, max_context=1024)
    ms = (time_decode_ahead if ahead else time_decode)(engine, args.concurrency, args.prompt, 32, 3)
    graphs = engine.info.cuda_graphs
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return {"decode_tok_s": round(args.concurrency * 1e3 / ms, 1), "ms_per_step": round(ms, 2), "cuda_graphs": graphs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--kv-gib", type=int, default=4)
    p.add_argument("--variants", default="inproc,inproc-ahead,colocated,ipc-1,ipc-2")
    p.add_argument("--budget-s", type=float, default=400.0, help="skip variants once this much time has passed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--trace", action="store_true", help="mesh variants: trace every step, report the router's "
                   "median step and gap between steps (tracing itself costs some speed)")
    p.add_argument("--logs", type=Path, default=Path(tempfile.mkdtemp(prefix="mesh-gpu-")))
    args = p.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="qwen3-30b-a3b-dummy-"))
    (model_dir / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "num_hidden_layers": args.layers}))
    rows = []
    for variant in args.variants.split(","):
        if time.monotonic() - T0 > args.budget_s:
            rows.append({"variant": variant, "error": f"skipped: {args.budget_s:.0f} s budget spent"})
            continue
        started = time.monotonic()
        try:
            row = run_inproc(args, model_dir, variant == "inproc-ahead") if variant.startswith("inproc") else run_mesh(
                args, model_dir, 0 if variant == "colocated" else int(variant.split("-")[1]), args.logs,
                pingpong=variant.endswith("-pp"))
        except Exception as exc:  # noqa: BLE001 -- recorded, the next variant still runs
            row = {"error": f"{type(exc).__name__}: {exc}"}
            for log in sorted(args.logs.glob("*.log")):
                print(f"--- {log.name} ---\n" + "\n".join(log.read_text().splitlines()[-15:]), flush=True)
        rows.append({"variant": variant, **row, "seconds": round(time.monotonic() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    write(args, rows)
    return 0


def write(args, rows: list[dict]) -> None:
    base = next((r["decode_tok_s"] for r in rows if r["variant"] == "inproc" and "decode_tok_s" in r), None)
    best = next((r["decode_tok_s"] for r in rows if r["variant"] == "inproc-ahead" and "decode_tok_s" in r), None)
    for r in rows:
        if base and "decode_tok_s" in r:
            r["vs_inproc"] = round(r["decode_tok_s"] / base, 3)
        if best and "decode_tok_s" in r:
            r["vs_inproc_ahead"] = round(r["decode_tok_s"] / best, 3)
    meta = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "command": "PYTHONPATH=. python3 " + " ".join(sys.argv), "layers": args.layers,
            "concurrency": args.concurrency, "prompt": args.prompt, "max_tokens": args.max_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mesh-h200.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Mesh vs in-process, Qwen3-30B-A3B shape, {args.layers} layers, random bf16, concurrency "
             f"{args.concurrency}", "", f"{meta['machine']}; `{meta['command']}`", "",
             "| variant | transports | decode tok/s | vs in-process | vs in-process launched ahead | output tok/s "
             "(whole run) | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {','.join(r.get('transports', [])) or '-'} | {r.get('decode_tok_s', '-')} | "
                     f"{r.get('vs_inproc', '-')} | {r.get('vs_inproc_ahead', '-')} | {r.get('output_tok_s', '-')} | "
                     f"{r.get('error') or r.get('cuda_graphs') or r.get('pingpong', '')} |")
    (args.out / "mesh-h200.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
