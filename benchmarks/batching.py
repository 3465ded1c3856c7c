"""Dynamic batching on the real mesh: Poisson arrivals against batcher + router + two expert shards (separate OS
processes, real gRPC), comparing the batcher's four modes (none, static, dynamic, continuous; see
services/batcher/policy.py) at several arrival rates.

Reproduces the claim users are told: "dynamic batching (max_batch_size=32, max_wait=0.1 s): GPU utilization from 65%
to 89%, mean response time under 200 ms". Per (mode, rate) it reports throughput, router utilization (router compute
seconds from the batcher's Prometheus counter over the cell's wall time), mean/p95 end-to-end latency, mean/p95 time
to first token, mean batch size, preemptions; prints a table and writes JSON + markdown to benchmarks/results/.

    .venv/bin/python benchmarks/batching.py --model tiny                          # tiny random MoE, ~3 min
    .venv/bin/python benchmarks/batching.py --model smollm2-moe --rates 0.5,1,2   # the built-in model
    python3 benchmarks/batching.py --model /tmp/qwen3moe-8l --device cuda --dtype bfloat16 --gpu-util  # a GPU
      (checkpoint from benchmarks/random_moe.py; router and both expert shards on the one GPU, as separate processes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moemesh.serving.supervisor import Child, stop_in_order  # noqa: E402
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2  # noqa: E402

MODES = ("none", "static", "dynamic", "continuous")
COUNTERS = {  # Prometheus series of the batcher read before and after each cell
    "busy": "moemesh_batcher_router_busy_seconds_total",
    "batch_sum": "moemesh_batcher_batch_size_sum", "batch_count": "moemesh_batcher_batch_size_count",
    "tokens_sum": "moemesh_batcher_iteration_tokens_sum", "preempt": "moemesh_batcher_num_preemptions_total",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random tiny MoE), a built-in name, or a checkpoint dir")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rates", default="5,20,60", help="Poisson arrival rates, requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per cell")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for stragglers after the arrivals")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=100.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per router/expert process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device of the router and the expert shards (cpu, cuda)")
    p.add_argument("--dtype", default="float32", help="compute dtype of the router and the expert shards")
    p.add_argument("--gpu-util", action="store_true", help="also sample GPU 0's busy fraction through NVML")
    p.add_argument("--logs", type=Path, default=None, help="copy the service processes' logs into this folder")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/batching-<model>.json)")
    return p.parse_args(argv)


# ---- the mesh ---------------------------------------------------------------------------------------------------------
def resolve_model(name: str, workdir: Path) -> str:
    if name == "tiny":
        from moemesh.builtin.tiny import make_tiny_model

        return str(make_tiny_model(workdir / "tiny"))
    from moemesh.models.registry import resolve_model as resolve

    return str(resolve(name, progress=True))


def child(name: str, module: str, env: dict[str, str], run: Path) -> Child:
    kind = name.split("-")[0].upper()
    env = {**env, "OTEL_SERVICE_NAME": name, "MOEMESH_READY_FILE": str(run / f"{name}.json"),
           f"MOEMESH_{kind}_PORT": "0", f"MOEMESH_{kind}_METRICS_PORT": "0", f"MOEMESH_{kind}_GRACE": "1"}
    return Child(name, [sys.executable, "-m", module], env, run / f"{name}.log")


def start(children: list[Child], run: Path, timeout: float = 600.0) -> dict[str, dict]:
    for c in children:
        c.start()
    ready, deadline = {}, time.monotonic() + timeout
    while len(ready) < len(children):
        for c in children:
            path = run / f"{c.name}.json"
            if c.exited() is not None:
                raise RuntimeError(f"{c.name} exited ({c.exited()}):\n{c.log_tail()}")
            if c.name not in ready and path.exists():
                ready[c.name] = json.loads(path.read_text())
        if time.monotonic() > deadline:
            raise RuntimeError(f"mesh not ready after {timeout:.0f} s")
        time.sleep(0.1)
    return ready


def scrape(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}
    return {key: values.get(series, 0.0) for key, series in COUNTERS.items()}


class GpuSampler:
    """NVML's utilization.gpu (share of the last sample period in which a kernel ran: what "GPU utilization" means
    in nvidia-smi) of GPU 0, sampled every 50 ms on a thread; mean(t0, t1) averages the samples in that window."""

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py; only with --gpu-util

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)  # bytes in older nvidia-ml-py
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def mean(self, t0: float, t1: float) -> float | None:
        window = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.fmean(window) / 100 if window else None


# ---- load -----------------------------------------------------------------------------------------------------------
async def one_request(stub, rid: str, prompt: list[int], max_tokens: int) -> dict:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    request = batcher_pb2.GenerateRequest(request_id=rid, tenant="bench", prompt_ids=prompt, sampling=sampling)
    start, first, tokens, last = time.perf_counter(), None, 0, None
    async for event in stub.Generate(request):
        if event.token_ids and first is None:
            first = time.perf_counter()
        tokens += len(event.token_ids)
        last = event
    end = time.perf_counter()
    return {"ttft": first - start, "e2e": end - start, "tokens": tokens, "start": start, "end": end,
            "engine_seconds": last.engine_seconds, "queue_seconds": last.queue_seconds}


async def run_cell(stub, rate: float, args, tag: str) -> tuple[list[dict], int, float, float]:
    """Open-loop Poisson arrivals for args.duration s; returns (results, unfinished, t0, t_end)."""
    rng = random.Random(f"{args.seed}-{rate}")
    tasks, t0, at = [], time.perf_counter(), 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= args.duration:
            break
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        prompt = [rng.randrange(100, 49000) for _ in range(args.prompt_tokens)]
        tasks.append(asyncio.ensure_future(one_request(stub, f"{tag}-{len(tasks)}", prompt, args.max_tokens)))
    done, pending = await asyncio.wait(tasks, timeout=max(0.1, t0 + args.duration + args.drain - time.perf_counter()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    results = [t.result() for t in done if t.exception() is None]
    failed = [t.exception() for t in done if t.exception() is not None]
    if failed:
        print(f"  {len(failed)} requests failed, e.g. {failed[0]!r}", file=sys.stderr)
    t_end = max((r["end"] for r in results), default=time.perf_counter()) if not pending else time.perf_counter()
    return results, len(pending) + len(failed), t0, t_end


def summarize(mode: str, rate: float, results: list[dict], unfinished: int, wall: float, delta: dict) -> dict:
    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    e2e, ttft = [r["e2e"] for r in results], [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    steps = delta["batch_count"] or 1
    return {
        "mode": mode, "rate_rps": rate, "requests": len(results) + unfinished, "completed": len(results),
        "unfinished": unfinished, "wall_s": wall, "throughput_tok_s": tokens / wall,
        "throughput_req_s": len(results) / wall, "router_utilization": delta["busy"] / wall,
        "tokens_per_busy_s": tokens / delta["busy"] if delta["busy"] else 0.0,
        "e2e_mean_s": statistics.fmean(e2e) if e2e else None, "e2e_p95_s": pct(e2e, 95) if e2e else None,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None, "ttft_p95_s": pct(ttft, 95) if ttft else None,
        "mean_batch_size": delta["batch_sum"] / steps, "tokens_per_step": delta["tokens_sum"] / steps,
        "steps": int(delta["batch_count"]), "preemptions": int(delta["preempt"]),
    }


async def bench(batchers: dict[str, dict], rates: list[float], args, gpu: GpuSampler | None) -> list[dict]:
    """Rates outer, modes inner: drifts in the shared machine's load hit every mode of a rate alike."""
    channels = {mode: grpc.aio.insecure_channel(b["address"]) for mode, b in batchers.items()}
    stubs = {mode: batcher_pb2_grpc.BatcherStub(ch) for mode, ch in channels.items()}
    warm = [random.Random(k).randrange(100, 49000) for k in range(args.prompt_tokens)]
    for mode, stub in stubs.items():
        await one_request(stub, f"{mode}-warm", warm, 2)
        await asyncio.gather(*[one_request(stub, f"{mode}-warm{k}", warm, 2) for k in range(8)])
    rows = []
    for rate in rates:
        for mode, stub in stubs.items():
            port = batchers[mode]["metrics_port"]
            before = scrape(port)
            results, unfinished, t0, t_end = await run_cell(stub, rate, args, f"{mode}-{rate}")
            await asyncio.sleep(0.3)  # let the batcher count the last steps
            delta = {k: v - before[k] for k, v in scrape(port).items()}
            rows.append(summarize(mode, rate, results, unfinished, t_end - t0, delta))
            if gpu is not None:
                rows[-1]["gpu_utilization"] = gpu.mean(t0, t_end)
            print(format_row(rows[-1]), flush=True)
            await asyncio.sleep(1.0)  # cancelled stragglers leave the router before the next cell
    for ch in channels.values():
        await ch.close()
    return sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["rate_rps"]))


# ---- report ---------------------------------------------------------------------------------------------------------
HEADER = ("| mode | rate req/s | done/sent | tok/s | router util | tok per busy s | e2e mean ms | e2e p95 ms "
          "| TTFT mean ms | TTFT p95 ms | batch | preempt |")
GPU_HEADER = HEADER + " GPU util |"


def separator(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def format_row(r: dict) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    line = (f"| {r['mode']} | {r['rate_rps']:g} | {r['completed']}/{r['requests']} | {r['throughput_tok_s']:.1f} "
            f"| {r['router_utilization']:.0%} | {r['tokens_per_busy_s']:.0f} | {ms(r['e2e_mean_s'])} "
            f"| {ms(r['e2e_p95_s'])} | {ms(r['ttft_mean_s'])} | {ms(r['ttft_p95_s'])} "
            f"| {r['mean_batch_size']:.1f} | {r['preemptions']} |")
    if "gpu_utilization" in r:
        line += " - |" if r["gpu_utilization"] is None else f" {r['gpu_utilization']:.0%} |"
    return line


def claim_line(mode: str, rows: list[dict]) -> str:
    top = max(rows, key=lambda r: r["rate_rps"])
    means = [(r["e2e_mean_s"], r["rate_rps"]) for r in rows if r["e2e_mean_s"] is not None]
    best = f"{min(means)[0] * 1000:.0f} ms (at {min(means)[1]:g} req/s)" if means else "-"
    under = [f"{r['rate_rps']:g}" for r in rows if r["e2e_mean_s"] is not None and r["e2e_mean_s"] < 0.2
             and r["unfinished"] == 0]
    gpu = [r["gpu_utilization"] for r in rows if r.get("gpu_utilization") is not None]
    gpu_text = f", GPU utilization {min(gpu):.0%}-{max(gpu):.0%}" if gpu else ""
    return (f"- {mode}: router utilization {min(r['router_utilization'] for r in rows):.0%}-"
            f"{max(r['router_utilization'] for r in rows):.0%}{gpu_text}; at {top['rate_rps']:g} req/s "
            f"{top['throughput_tok_s']:.1f} tok/s, {top['completed']}/{top['requests']} done; best mean response "
            f"{best}; mean under 200 ms (all done) at: {', '.join(under) or 'no rate'} req/s")


def machine(args, gpu: GpuSampler | None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor(), "loadavg_at_end": load, "git_commit": commit, "device": args.device,
            "dtype": args.dtype, "gpu": gpu.name if gpu is not None else None}


def model_shape(model_dir: str) -> str:
    """One line from config.json: architecture, layers, hidden, experts/top-k, expert FFN, vocab."""
    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "?"
    experts = c.get("num_experts", c.get("num_local_experts"))
    return (f"{c.get('architectures', ['?'])[0]}: {c.get('num_hidden_layers')} layers, hidden {c.get('hidden_size')}, "
            f"{c.get('num_attention_heads')} heads / {c.get('num_key_value_heads')} KV heads, {experts} experts "
            f"top-{c.get('num_experts_per_tok')}, expert FFN {c.get('moe_intermediate_size')}, "
            f"vocab {c.get('vocab_size')}")


def write(rows: list[dict], args, model: str, started: float, gpu: GpuSampler | None) -> Path:
    out = args.out or ROOT / "benchmarks" / "results" / f"batching-{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "batching", "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model,
           "model_dir": model, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "model_shape": model_shape(model), "machine": machine(args, gpu), "started_unix": started,
           "seconds": time.time() - started, "rows": rows}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    header = GPU_HEADER if gpu is not None else HEADER
    where = f"; {gpu.name}, router and experts on {args.device} in {args.dtype}" if gpu is not None else ""
    md = [f"# Batching benchmark: {args.model}", "", f"Command: `{doc['command']}`", "",
          f"Model: {doc['model_shape']}", "",
          f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs{where}, load average at end "
          f"{doc['machine']['loadavg_at_end']}; commit {doc['machine']['git_commit'][:12]}", "", header,
          separator(header)]
    md += [format_row(r) for r in rows]
    md += ["", "## Against the claim (\"utilization 65% -> 89%, mean response time under 200 ms\")", ""]
    md += [claim_line(mode, [r for r in rows if r["mode"] == mode]) for mode in dict.fromkeys(r["mode"] for r in rows)]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    modes, rates = args.modes.split(","), [float(r) for r in args.rates.split(",")]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="moemesh-bench-") as tmp:
        run = Path(tmp)
        from moemesh.home import models_dir

        model = resolve_model(args.model, run)
        env = {**os.environ, "MOEMESH_HOME": str(run / "home"), "MOEMESH_MODELS": str(models_dir()),
               "MOEMESH_MODEL": model, "PYTHONUNBUFFERED": "1", "MOEMESH_ROUTER_COMPUTE_THREADS": str(args.threads),
               "MOEMESH_EXPERT_COMPUTE_THREADS": str(args.threads), "MOEMESH_EXPERT_NUM_SHARDS": "2",
               "MOEMESH_ROUTER_DEVICE": args.device, "MOEMESH_ROUTER_DTYPE": args.dtype,
               "MOEMESH_EXPERT_DEVICE": args.device, "MOEMESH_EXPERT_DTYPE": args.dtype}
        gpu = GpuSampler() if args.gpu_util else None
        experts = [child(f"expert-{i}", "services.expert", {**env, "MOEMESH_EXPERT_SHARD_INDEX": str(i)}, run)
                   for i in (0, 1)]
        core = experts[:]
        rows: list[dict] = []
        try:
            info = start(experts, run)
            env["EXPERT_ADDRS"] = ",".join(info[c.name]["address"] for c in experts)
            router = child("router", "services.router", env, run)
            core.append(router)
            env["ROUTER_ADDR"] = start([router], run)["router"]["address"]
            header = GPU_HEADER if gpu is not None else HEADER
            print(header + "\n" + separator(header), flush=True)
            batchers = []
            for mode in modes:  # one batcher per mode, all on the one router; only one has load at a time
                knobs = {"MOEMESH_BATCHER_MODE": mode, "MOEMESH_BATCHER_MAX_BATCH_SIZE": str(args.max_batch_size),
                         "MOEMESH_BATCHER_MAX_WAIT_MS": str(args.max_wait_ms),
                         "MOEMESH_BATCHER_MAX_STEP_TOKENS": str(max(512, args.max_batch_size))}
                batchers.append(child(f"batcher-{mode}", "services.batcher", {**env, **knobs}, run))
            core += batchers
            info = start(batchers, run)
            rows = asyncio.run(bench({m: info[f"batcher-{m}"] for m in modes}, rates, args, gpu))
        finally:
            stop_in_order([[c for c in core if c.name.startswith("batcher")], [c for c in core if c.name == "router"],
                           experts], budget_s=10)
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for c in core:
                    shutil.copyfile(c.log_path, args.logs / c.log_path.name)
        out = write(rows, args, model, started, gpu)
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
