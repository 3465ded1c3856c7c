"""Soak: `moemesh up` on the tiny model under Poisson load at 80% of its measured capacity for --minutes (issue 12:
20); then the slow-reader phase: a second tenant holds --slow-streams streams open, reading one chunk a second.

Figures: per service RSS growth and open file descriptors from the end of the first window (warm-up: allocator,
connection pools, caches) to the last sample (must be <= 10%, flat), and from the very first sample; p99 end-to-end
latency of the last window vs the first (windows of min(5 min, a third of the run); must be <= 1.2x). Slow-reader
phase: the load tenant runs at 30% of capacity (inside its fair share of two tenants) for --minutes/3 without, then
as long with the slow streams; its p99 with them vs without says whether they starve it.

    .venv/bin/python benchmarks/soak.py --minutes 20 --slow-streams 1000     # the issue's run
    .venv/bin/python benchmarks/soak.py --minutes 3 --slow-streams 200       # a short validation
Writes benchmarks/results/soak.json and soak.md (machine, command).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from chaos import start_mesh, tiny_model  # noqa: E402
from moemesh.bench.backends import GrpcBackend  # noqa: E402
from moemesh.bench.load import LoadRun  # noqa: E402
from moemesh.bench.report import machine  # noqa: E402
from moemesh.bench.stats import percentile  # noqa: E402
from moemesh.bench.workload import LoadSpec  # noqa: E402
from moemesh.sdk.client import build_request  # noqa: E402
from moemesh.v1 import chat_pb2_grpc  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPT, MAX_TOKENS = 32, 32


def sample(status_path: Path) -> dict[str, tuple[int, int]]:
    """service -> (RSS KiB, open fds) of its main process (metering's embedded Redis: its own row)."""
    out = {}
    for name, svc in json.loads(status_path.read_text())["services"].items():
        pids = [(name, svc["pid"])] + [(f"{name}/{c}", c) for c in _children(svc["pid"])]
        for label, pid in pids:
            try:
                rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                out[label] = (rss, len(os.listdir(f"/proc/{pid}/fd")))
            except (OSError, StopIteration):
                pass
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def capacity(target: str, key: str, model: str, seconds: float) -> float:
    """Completed requests per second of a closed loop at 16 streams (the mesh's saturation, tiny model)."""
    spec = LoadSpec(concurrency=16, requests=None, duration_s=seconds, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS,
                    ignore_eos=True)
    backend = GrpcBackend(target, key, model, 60.0)
    records, duration = await LoadRun(backend, spec).run()
    await backend.close()
    return sum(r.ok for r in records) / duration


async def slow_readers(target: str, key: str, model: str, count: int, hold_s: float, held: list[int]) -> list[str]:
    """`count` streams of the slow tenant, each reading one chunk per second for hold_s; returns their errors."""
    import grpc

    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, count // 100))]
    metadata = (("authorization", f"Bearer {key}"),)

    async def one(i: int) -> str:
        stub = chat_pb2_grpc.ChatStub(channels[i % len(channels)])
        request = build_request("slow reader " * 4, model=model, max_tokens=200, ignore_eos=True)
        call = stub.StreamChatCompletion(request, metadata=metadata, timeout=hold_s + 120)
        held[0] += 1
        try:
            end = time.monotonic() + hold_s
            async for _ in call:
                if time.monotonic() > end:
                    break
                await asyncio.sleep(1.0)  # a client reading slowly: HTTP/2 flow control pushes back
            return ""
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()[:100]}"
        finally:
            held[0] -= 1
            call.cancel()

    errors = await asyncio.gather(*(one(i) for i in range(count)))
    for channel in channels:
        await channel.close()
    return [e for e in errors if e]


def p99(records, start: float, end: float) -> float | None:
    e2e = sorted(r.end - r.start for r in records if r.ok and start <= r.start < end)
    return round(percentile(e2e, 99), 3) if e2e else None


async def run(args: argparse.Namespace) -> dict:
    home = Path(tempfile.mkdtemp(prefix="moemesh-soak-"))
    proc, status_path = start_mesh(home, tiny_model())
    status = json.loads(status_path.read_text())
    target, key, model = status["gateway"], status["api_key"], status["model"]
    slow_key = _tenant(home, "slow")
    cap = await capacity(target, key, model, args.capacity_s)
    total, samples = args.minutes * 60, []
    clock0 = time.perf_counter()
    soak = asyncio.create_task(_load(target, key, model, 0.8 * cap, total, seed=1))
    watcher = asyncio.create_task(_watch(soak, status_path, samples, clock0, min(10.0, total / 30)))
    records, duration = await soak
    await watcher
    window = min(300.0, total / 3)
    first, last = p99(records, clock0, clock0 + window), p99(records, clock0 + total - window, clock0 + total)
    slow = await _slow_phase(target, key, slow_key, model, 0.3 * cap, total / 3, args.slow_streams)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return {"minutes": args.minutes, "capacity_rps": round(cap, 2), "rate_rps": round(0.8 * cap, 2),
            "requests": len(records), "failed": sum(not r.ok for r in records), "duration_s": round(duration, 1),
            "p99_first_s": first, "p99_last_s": last, "p99_ratio": round(last / first, 3) if first and last else None,
            "window_s": window, "services": _growth(samples, window), "slow": slow}


async def _load(target: str, key: str, model: str, rate: float, seconds: float, seed: int):
    spec = LoadSpec(concurrency=256, rate=rate, requests=None, duration_s=seconds, prompt_tokens=PROMPT,
                    max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed)
    backend = GrpcBackend(target, key, model, 120.0)
    try:
        return await LoadRun(backend, spec).run()
    finally:
        await backend.close()


async def _watch(load: asyncio.Task, status_path: Path, samples: list, clock0: float, every: float) -> None:
    while not load.done():
        samples.append((time.perf_counter() - clock0, sample(status_path)))
        await asyncio.sleep(every)


async def _slow_phase(target: str, key: str, slow_key: str, model: str, rate: float, seconds: float,
                      streams: int) -> dict:
    """The load tenant at `rate` for `seconds` alone, then as long next to `streams` slow readers of tenant slow."""
    alone, _ = await _load(target, key, model, rate, seconds, seed=2)
    held: list[int] = [0]
    mixed = asyncio.create_task(_load(target, key, model, rate, seconds, seed=3))
    slow_errors = await slow_readers(target, slow_key, model, streams, seconds, held)
    records, _ = await mixed
    return {"streams": streams, "rate_rps": round(rate, 2), "seconds": round(seconds), "errors": len(slow_errors),
            "error_samples": sorted(set(slow_errors))[:5], "p99_alone_s": p99(alone, 0, float("inf")),
            "p99_with_slow_s": p99(records, 0, float("inf")), "failed_with_slow": sum(not r.ok for r in records)}


def _tenant(home: Path, name: str) -> str:
    env = {**os.environ, "MOEMESH_HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "moemesh.cli.main", "tenants", "create", name, "--concurrency", "0",
                          "--json"], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)["api_key"]


def _growth(samples: list, warm_s: float) -> dict:
    first, last = samples[0][1], samples[-1][1]
    warm = next((s for t, s in samples if t >= warm_s), first)
    out = {}
    for name in sorted(set(first) & set(last) & set(warm)):
        (rss0, fd0), (rssw, fdw), (rss1, fd1) = first[name], warm[name], last[name]
        out[name] = {"rss_kib": [rss0, rssw, rss1], "rss_growth_pct": round(100 * (rss1 - rssw) / rssw, 1),
                     "rss_growth_from_start_pct": round(100 * (rss1 - rss0) / rss0, 1), "fds": [fd0, fdw, fd1],
                     "fds_max": max(s[1][name][1] for s in samples if name in s[1])}
    return out


def write(doc: dict, argv: list[str]) -> None:
    doc.update(machine=machine(), command=" ".join([".venv/bin/python", "benchmarks/soak.py", *argv]),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = ["| process | RSS KiB start / after warm-up / end | growth after warm-up (from start) | "
            "open fds start / after warm-up / end (max) |", "|---|---|---|---|"]
    for name, s in doc["services"].items():
        rows.append(f"| {name} | {' / '.join(map(str, s['rss_kib']))} | {s['rss_growth_pct']}% "
                    f"({s['rss_growth_from_start_pct']}%) | {' / '.join(map(str, s['fds']))} ({s['fds_max']}) |")
    slow = doc["slow"]
    text = "\n".join([
        f"# Soak ({doc['minutes']} minutes)", "", f"Command: `{doc['command']}` ({doc['date']})", "",
        f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs (shared), load average "
        f"{doc['machine']['loadavg']}, commit {doc['machine']['git_commit']}. Tiny MoE model.", "",
        f"Capacity {doc['capacity_rps']} req/s (closed loop, 16 streams); soak at {doc['rate_rps']} req/s (80%, "
        f"Poisson): {doc['requests']} requests, {doc['failed']} failed.", "",
        f"p99 end-to-end: first {doc['window_s']:.0f} s {doc['p99_first_s']} s, last {doc['p99_last_s']} s "
        f"(ratio {doc['p99_ratio']}; limit 1.2).", "", *rows, "",
        f"Slow readers (tenant `slow`, 1 chunk/s, after the soak): {slow['streams']} streams held "
        f"{slow['seconds']} s, {slow['errors']} errors {slow['error_samples'] or ''}; the load tenant at "
        f"{slow['rate_rps']} req/s (30% of capacity): p99 alone {slow['p99_alone_s']} s, next to the slow streams "
        f"{slow['p99_with_slow_s']} s ({slow['failed_with_slow']} failed).", ""])
    (RESULTS / "soak.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--slow-streams", type=int, default=1000)
    p.add_argument("--capacity-s", type=float, default=30.0, help="seconds of the capacity measurement")
    doc = asyncio.run(run(p.parse_args(argv)))
    write(doc, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
