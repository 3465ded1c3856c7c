"""Prefix cache on versus off: the real batcher scheduler (continuous batching, chunked prefill) driving the real
engine in one process (services/batcher/local_router.py: the Router contract without sockets), wall clock.

Workloads (same token ids, same schedule, only the router's prefix cache differs):
  - shared: one 1,024-token system prompt, 32 users each adding a 32-token question, 8 tokens out, all arriving
    together (a cold service: nobody's prefix is written yet; with the cache on, the batcher holds users 1-31 until
    user 0 has fed the system prompt, then they hit it: services/batcher/prefix_sharing.py). Reported: wall time and
    requests/s of all 32, their mean TTFT, then the median TTFT of 5 more users arriving alone one after another
    (their prefix cached with the cache on).
  - multi-turn: 4 conversations x 4 turns; each turn's prompt is the whole conversation so far (previous prompt +
    the answer + 48 new tokens), 16 tokens out; the conversations' turns run concurrently.

    .venv/bin/python benchmarks/prefix_cache.py                      # built-in smollm2-moe, CPU
    .venv/bin/python benchmarks/prefix_cache.py --device cuda --dtype bfloat16 --out prefix-cache-h200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# libgomp's default spinning workers make every step several times slower on 2 cores shared with other work
# (benchmarks/mesh_decode.py measured 7x); passive waiting as `moemesh up` gives its compute processes. Set before
# torch loads libgomp; an explicit value wins (recorded in the JSON).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moemesh.runtime.engine import Engine  # noqa: E402
from services.batcher.kv_view import KvView  # noqa: E402
from services.batcher.local_router import LocalRouter  # noqa: E402
from services.batcher.policy import Policy  # noqa: E402
from services.batcher.scheduler import Scheduler  # noqa: E402
from services.batcher.sequence import Sequence  # noqa: E402


class Bench:
    """One engine, one scheduler; run() steps until the given sequences finish, noting first-token times."""

    def __init__(self, engine: Engine, policy: Policy) -> None:
        self.engine, self.router = engine, LocalRouter(engine)
        info = engine.info
        self.sched = Scheduler(policy, KvView(info.kv_block_size, info.kv_blocks_total), info.max_context, (),
                               time.monotonic)
        self.added: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.outputs: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}

    def add(self, seq_id: str, prompt: list[int], max_tokens: int, tenant: str = "acme") -> None:
        self.sched.add(Sequence(seq_id=seq_id, prompt_ids=prompt, max_tokens=max_tokens, tenant=tenant,
                                ignore_eos=True))
        self.added[seq_id] = time.monotonic()

    def run(self, until=lambda b: False) -> None:
        """Steps until nothing runs or waits, or until(self) holds."""
        while (self.sched.running or len(self.sched.queue)) and not until(self):
            plan = self.sched.schedule()
            if plan is None:
                asyncio.run(self.router.release(self.sched.take_releases()))
                continue
            self.sched.complete(plan, self.router.run(plan))
            now = time.monotonic()
            for e in self.sched.take_events():
                if e.token_ids:
                    self.first.setdefault(e.seq_id, now)
                    self.outputs.setdefault(e.seq_id, []).extend(e.token_ids)
                if e.finish is not None:
                    self.cached[e.seq_id] = e.cached_tokens
        asyncio.run(self.router.release(self.sched.take_releases()))

    def ttft(self, seq_id: str) -> float:
        return self.first[seq_id] - self.added[seq_id]


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(200, 40000) for _ in range(n)]


def shared_workload(bench: Bench, rng: random.Random, users: int, system_len: int, late_users: int = 5,
                    profile: Path | None = None) -> dict:
    system = tokens(rng, system_len)
    questions = [tokens(rng, 32) for _ in range(users + 1)]
    start = time.monotonic()
    for i in range(users):
        bench.add(f"u{i}", system + questions[i], 8)
    bench.run()
    wall = time.monotonic() - start
    ttfts = sorted(bench.ttft(f"u{i}") for i in range(users))
    late = []  # users arriving alone, one after another: with the cache on each finds the system prompt cached
    for i in range(late_users):
        with _profiled(profile if i == late_users - 1 else None):
            bench.add(f"late{i}", system + tokens(rng, 32), 8)
            bench.run()
        late.append(bench.ttft(f"late{i}"))
    return {"wall_s": wall, "requests_per_s": users / wall, "mean_ttft_s": sum(ttfts) / len(ttfts),
            "cold_ttft_s": bench.ttft("u0"), "cached_prefix_ttft_s": statistics.median(late),
            "late_ttfts_s": late, "cached_tokens": sum(bench.cached.values())}


@contextlib.contextmanager
def _profiled(path: Path | None):
    """torch.profiler around one late user's whole request when asked: where a cached request's time goes."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        yield
    path.parent.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    path.write_text(avg.table(sort_by="self_cpu_time_total", row_limit=40) + "\n" +
                    (avg.table(sort_by="self_cuda_time_total", row_limit=25) if len(acts) > 1 else ""))


def multi_turn_workload(bench: Bench, rng: random.Random, chats: int, turns: int) -> dict:
    prompts = {c: tokens(rng, 64) for c in range(chats)}
    ttfts, start = [], time.monotonic()
    for turn in range(turns):
        ids = [f"c{c}t{turn}" for c in range(chats)]
        for c, seq_id in zip(range(chats), ids):
            bench.add(seq_id, prompts[c], 16)
        bench.run()
        for c, seq_id in zip(range(chats), ids):
            ttfts.append(bench.ttft(seq_id))
            prompts[c] = prompts[c] + bench.outputs[seq_id] + tokens(rng, 48)
    wall = time.monotonic() - start
    return {"wall_s": wall, "requests_per_s": chats * turns / wall, "mean_ttft_s": sum(ttfts) / len(ttfts),
            "cached_tokens": sum(bench.cached.values())}


def run_mode(args, cache: bool) -> dict:
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, kv_blocks=args.kv_blocks,
                         block_size=16, prefix_cache=cache, load_format=args.load_format)
    policy = Policy(mode="continuous", max_batch_size=32, max_step_tokens=args.step_tokens, max_wait=0.0)
    prof = args.profile / f"late-cache-{'on' if cache else 'off'}.txt" if args.profile else None
    out = {"shared": shared_workload(Bench(engine, policy), random.Random(0), args.users, args.system_tokens,
                                     args.late_users, prof)}
    out["multi_turn"] = multi_turn_workload(Bench(engine, policy), random.Random(1), args.chats, args.turns)
    return out


def table(results: dict) -> str:
    on, off = results["on"], results["off"]
    rows = [("shared: requests/s (32 users)", "shared", "requests_per_s", True),
            ("shared: wall time, 32 users (s)", "shared", "wall_s", False),
            ("shared: mean TTFT of the 32 users (s)", "shared", "mean_ttft_s", False),
            ("shared: TTFT, 1,024-token prefix cached (s)", "shared", "cached_prefix_ttft_s", False),
            ("shared: cached prompt tokens", "shared", "cached_tokens", True),
            ("multi-turn: requests/s", "multi_turn", "requests_per_s", True),
            ("multi-turn: mean TTFT (s)", "multi_turn", "mean_ttft_s", False),
            ("multi-turn: cached prompt tokens", "multi_turn", "cached_tokens", True)]
    lines = ["| metric | cache off | cache on | on vs off |", "|---|---|---|---|"]
    for label, w, k, higher in rows:
        a, b = off[w][k], on[w][k]
        ratio = f"{(b / a if higher else a / b):.1f}x {'higher' if higher else 'lower'}" if a and b else "-"
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-moe")
    p.add_argument("--load-format", default="auto", help="dummy: random weights of the checkpoint's shape (the "
                   "compute a cache hit skips does not depend on the weights' values)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument("--chats", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=4096)
    p.add_argument("--step-tokens", type=int, default=512)
    p.add_argument("--late-users", type=int, default=5, help="users arriving alone after the 32: the cached-prefix "
                   "TTFT is their median")
    p.add_argument("--profile", type=Path, default=None, help="folder: torch.profiler tables of the last late user")
    p.add_argument("--out", default="prefix-cache-cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()  # the machine may be shared: say how busy it was
    results = {mode: run_mode(args, mode == "on") for mode in ("off", "on")}
    md = table(results)
    print(md)
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    out = ROOT / "benchmarks" / "results"
    (out / f"{args.out}.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    (out / f"{args.out}.md").write_text(f"# Prefix cache on vs off\n\n`{meta['command']}` on {meta['machine']}, "
                                        f"{meta['cpus']} CPUs, {meta['torch_threads']} torch threads, "
                                        f"device {' '.join(filter(None, (args.device, meta['gpu'])))}; load average (1, 5, 15 min) "
                                        f"{_load(load_start)} at the start, {_load(meta['loadavg_end'])} at the end"
                                        f"\n\n{md}\n")


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


if __name__ == "__main__":
    main()
