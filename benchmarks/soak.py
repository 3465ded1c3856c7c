"""Soak: `moemesh up` on the tiny model under Poisson load at 80% of its measured capacity for --minutes (issue 12:
20); then the slow-reader phase: a second tenant holds --slow-streams streams open, reading one chunk a second.

Figures: per service RSS growth and open file descriptors from the end of the first window (warm-up: allocator,
connection pools, caches) to the last sample (must be <= 10%, flat), and from the very first sample; p99 end-to-end
latency of the last window vs the first (windows of min(5 min, a third of the run); must be <= 1.2x). Slow-reader
phase: the load tenant runs at 30% of capacity (inside its fair share of two tenants) for --slow-minutes without,
then as long next to the slow streams (each asks for --slow-tokens tokens and reads one chunk a second); its p99
with them vs without says whether they starve it. RSS and fds are sampled all along (the series is in the JSON).

    .venv/bin/python benchmarks/soak.py --minutes 20 --slow-streams 1000     # the issue's run
    .venv/bin/python benchmarks/soak.py --minutes 3 --slow-streams 200 --slow-minutes 1   # a short validation
    .venv/bin/python benchmarks/soak.py --phase slow --slow-streams 1000 --slow-minutes 2   # the slow phase only
Writes benchmarks/results/soak.json and soak.md (machine, command); --phase slow: slow-readers.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from chaos import start_mesh, tiny_model  # noqa: E402
from slow_phase import NOTES, overview, rows as slow_rows, run_slow_phase, summary as slow_summary  # noqa: E402
from moemesh.bench.backends import GrpcBackend  # noqa: E402
from moemesh.bench.load import LoadRun  # noqa: E402
from moemesh.bench.report import machine  # noqa: E402
from moemesh.bench.stats import percentile  # noqa: E402
from moemesh.bench.workload import LoadSpec  # noqa: E402

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


def p99(records, start: float, end: float) -> float | None:
    e2e = sorted(r.end - r.start for r in records if r.ok and start <= r.start < end)
    return round(percentile(e2e, 99), 3) if e2e else None


async def run(args: argparse.Namespace) -> dict:
    home = Path(tempfile.mkdtemp(prefix="moemesh-soak-"))
    # The batcher's queue holds every waiting stream: room for the slow tenant's, and a per-tenant bound so that one
    # tenant cannot fill it for the others (README: limits).
    per_tenant = max(1024, args.slow_streams + 64)
    os.environ.setdefault("MOEMESH_BATCHER_MAX_QUEUE_PER_TENANT", str(per_tenant))
    os.environ.setdefault("MOEMESH_BATCHER_MAX_QUEUE", str(2 * per_tenant))
    proc, status_path = start_mesh(home, tiny_model())
    status = json.loads(status_path.read_text())
    target, key, model = status["gateway"], status["api_key"], status["model"]
    slow_key = _tenant(home, "slow")
    load = lambda rate, seconds, seed: _load(target, key, model, rate, seconds, seed)  # noqa: E731
    if args.phase == "slow":
        try:
            return await _slow_only(target, key, slow_key, model, status_path, load, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    cap = await capacity(target, key, model, args.capacity_s)
    total, samples = args.minutes * 60, []
    clock0 = time.perf_counter()
    soak = asyncio.create_task(_load(target, key, model, 0.8 * cap, total, seed=1))
    done = asyncio.Event()
    watcher = asyncio.create_task(_watch(done, status_path, samples, clock0, min(10.0, total / 30)))
    records, duration = await soak
    window = min(300.0, total / 3)
    first, last = p99(records, clock0, clock0 + window), p99(records, clock0 + total - window, clock0 + total)
    soak_samples = [x for x in samples if x[0] <= total + 1]
    slow = await run_slow_phase(target, key, slow_key, model, status_path, 0.3 * cap, args, load)
    done.set()
    await watcher
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return {"minutes": args.minutes, "capacity_rps": round(cap, 2), "rate_rps": round(0.8 * cap, 2),
            "requests": len(records), "failed": sum(not r.ok for r in records), "duration_s": round(duration, 1),
            "p99_first_s": first, "p99_last_s": last, "p99_ratio": round(last / first, 3) if first and last else None,
            "window_s": window, "services": _growth(soak_samples, window), "slow": slow,
            "series": _series(samples, 60.0), "soak_s": total,
            "batcher_env": {k: v for k, v in os.environ.items() if k.startswith("MOEMESH_BATCHER_")}}


async def _load(target: str, key: str, model: str, rate: float, seconds: float, seed: int):
    spec = LoadSpec(concurrency=256, rate=rate, requests=None, duration_s=seconds, prompt_tokens=PROMPT,
                    max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed)
    backend = GrpcBackend(target, key, model, 120.0)
    try:
        return await LoadRun(backend, spec).run()
    finally:
        await backend.close()


async def _watch(done: asyncio.Event, status_path: Path, samples: list, clock0: float, every: float) -> None:
    while not done.is_set():
        samples.append((time.perf_counter() - clock0, sample(status_path)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)
    samples.append((time.perf_counter() - clock0, sample(status_path)))


def _series(samples: list, every: float) -> list[dict]:
    """One sample per `every` seconds: {"t": s, "<service>": [RSS KiB, fds]}."""
    out, next_t = [], 0.0
    for t, s in samples:
        if t >= next_t or (t, s) == samples[-1]:
            out.append({"t": round(t), **{k: list(v) for k, v in s.items()}})
            next_t = t + every
    return out


async def _slow_only(target: str, key: str, slow_key: str, model: str, status_path: Path, load, args) -> dict:
    """--phase slow: the slow-reader phase on a fresh mesh, the load tenant at --load-rate (or 30% of capacity)."""
    await load(2.0, 10.0, 9)  # warm-up
    rate = args.load_rate or 0.3 * await capacity(target, key, model, args.capacity_s)
    slow = await run_slow_phase(target, key, slow_key, model, status_path, rate, args, load)
    return {"phase": "slow", "slow": slow, "env": {k: v for k, v in os.environ.items() if k.startswith("MOEMESH_")}}


def _tenant(home: Path, name: str) -> str:
    env = {**os.environ, "MOEMESH_HOME": str(home)}
    limits = ["--concurrency", "0", "--rpm", "0", "--tpm", "0"]  # unlimited: the mesh's own limits are under test
    out = subprocess.run([sys.executable, "-m", "moemesh.cli.main", "tenants", "create", name, *limits, "--json"],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
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


def write(doc: dict, argv: list[str], name: str = "soak") -> None:
    doc.update(machine=machine(), command=" ".join([".venv/bin/python", "benchmarks/soak.py", *argv]),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = ["| process | RSS KiB start / after warm-up / end | growth after warm-up (from start) | "
            "open fds start / after warm-up / end (max) |", "|---|---|---|---|"]
    for svc, s in doc["services"].items():
        rows.append(f"| {svc} | {' / '.join(map(str, s['rss_kib']))} | {s['rss_growth_pct']}% "
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
        "RSS / open fds per service over time (soak, then the slow-reader phase):", "", *_series_rows(doc), "",
        "Slow readers, after the soak:", "", slow_summary(slow), "", *slow_rows(slow), ""])
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def _series_rows(doc: dict) -> list[str]:
    """Every 5 minutes (and the last sample): RSS MiB / fds per service."""
    names = sorted(doc["services"])
    picked, next_t = [], 0
    for row in doc["series"]:
        if row["t"] >= next_t or row is doc["series"][-1]:
            picked.append(row)
            next_t = row["t"] + 300
    out = ["| t (s) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in picked:
        cells = [f"{row[n][0] / 1024:.0f} MiB / {row[n][1]}" if n in row else "-" for n in names]
        out.append(f"| {row['t']} | " + " | ".join(cells) + " |")
    return out


def write_slow(doc: dict, argv: list[str], label: str) -> None:
    """--phase slow: adds this run as `label` (replacing a run of that label) to benchmarks/results/slow-readers.json
    and renders every run in slow-readers.md."""
    doc.update(label=label, machine=machine(), command=shlex.join([".venv/bin/python", "benchmarks/soak.py", *argv]),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    path = RESULTS / "slow-readers.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in old.get("runs", []) if r["label"] != label] + [doc]
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    text = "\n".join(["# Slow readers next to a tenant under load", "", NOTES, "", *overview(runs), "",
                      *[line for run in runs for line in _run(run)]])
    (RESULTS / "slow-readers.md").write_text(text)
    print(text)


def _run(doc: dict) -> list[str]:
    m, slow = doc["machine"], doc["slow"]
    return [f"## {doc['label']}", "", f"Command: `{doc['command']}` ({doc['date']})", "",
            f"Machine: {m['platform']}, {m['cpus']} CPUs (shared with other work), load average {m['loadavg']}, commit "
            f"{m['git_commit']}. Tiny MoE model, `moemesh up`; env {doc['env']}.", "",
            slow_summary(slow), "", *slow_rows(slow), ""]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--slow-streams", type=int, default=1000)
    p.add_argument("--capacity-s", type=float, default=30.0, help="seconds of the capacity measurement")
    p.add_argument("--slow-minutes", type=float, default=4.0, help="minutes of each half of the slow-reader phase")
    p.add_argument("--slow-tokens", type=int, default=1000, help="max_tokens of each slow stream")
    p.add_argument("--slow-window", type=int, default=65535,
                   help="slow clients' HTTP/2 stream window in bytes (the RFC default; 0: grpc's BDP-grown window)")
    p.add_argument("--name", default="soak", help="result files benchmarks/results/<name>.{json,md}")
    p.add_argument("--phase", choices=("all", "slow"), default="all",
                   help="all: the soak, then the slow-reader phase; slow: the slow-reader phase only")
    p.add_argument("--load-rate", type=float, default=0.0,
                   help="--phase slow: the load tenant's req/s (0: 30%% of the measured capacity)")
    p.add_argument("--label", default="default", help="--phase slow: the run's name in slow-readers.{json,md}")
    args = p.parse_args(argv)
    doc = asyncio.run(run(args))
    if args.phase == "slow":
        write_slow(doc, argv, args.label)
    else:
        write(doc, argv, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
