"""A short request arriving during a long prefill, on the real mesh: `moemesh up --no-auth` (gateway, batcher, router,
expert shards as separate processes, the built-in model, CPU), requests sent to its batcher's Generate as token ids.

Per repeat (the two runs interleaved, alone first in odd repeats and last in even ones, so that load drift on a
shared machine hits both alike; fresh random prompts every run, so the prefix cache never helps):
  alone: a long prompt (--long-tokens, default 7,800) with 1 token out, by itself: its time to first token;
  mixed: a long prompt, then --delay s (default 3) later a short one (--short-tokens, default 5; 4 tokens out): the
         short one's TTFT from its own send, and the long one's TTFT.
Targets (issue 14): the short request's first token within 3 s; the long prompt's TTFT at most 20% above alone.
Also reported: the long prompt's mean step time (its TTFT alone over the batcher's steps meanwhile) and the short
request's TTFT in such steps, a figure that does not depend on how loaded the shared machine is.

    .venv/bin/python benchmarks/long_prompt_interleave.py [--repeats 2] [--model smollm2-moe]

Writes benchmarks/results/long-prompt-interleave-cpu.json and .md (machine, load average, command).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.mesh_process import stop_mesh  # noqa: E402


def start_mesh(model: str, workdir: Path) -> tuple[subprocess.Popen, dict]:
    """`moemesh up --no-auth` with every default, as a new user runs it; returns (process, status file)."""
    from moemesh import home
    from tests.mesh_process import free_port, wait_status

    env = {**os.environ, "MOEMESH_HOME": str(workdir / "home"),
           "MOEMESH_MODELS": os.environ.get("MOEMESH_MODELS") or str(home.models_dir())}
    status, log = workdir / "status.json", workdir / "up.log"
    cmd = [sys.executable, "-m", "moemesh.cli.main", "up", "--model", model, "--no-auth", "--gateway-port",
           str(free_port()), "--status-file", str(status)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    return proc, wait_status(proc, status, log, timeout_s=900)


async def ttft(stub, prompt: list[int], max_tokens: int, rid: str) -> float:
    """Seconds from sending a Generate to its first token (the stream is read to its end)."""
    from moemesh.v1 import batcher_pb2, common_pb2

    request = batcher_pb2.GenerateRequest(request_id=rid, tenant="bench", prompt_ids=prompt,
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    start, first = time.perf_counter(), None
    async for event in stub.Generate(request, timeout=1800):
        if event.token_ids and first is None:
            first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{rid}: no token")
    return first


async def mixed_run(stub, draw, args: argparse.Namespace, rep: int) -> tuple[float, float]:
    """The long prompt, the short one --delay s later: (short TTFT, long TTFT)."""
    long_task = asyncio.ensure_future(ttft(stub, draw(args.long_tokens), 1, f"long-{rep}"))
    await asyncio.sleep(args.delay)
    short = await ttft(stub, draw(args.short_tokens), 4, f"short-{rep}")
    return short, await long_task


def steps_done(metrics_port: int) -> float:
    """Steps the batcher has run (its iteration-tokens histogram's count)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("moemesh_batcher_iteration_tokens_count"))


async def measure(batcher: dict, args: argparse.Namespace, save) -> list[dict]:
    """Runs the repeats; save(rows) after each, so a long run cut short still leaves its results. The long prompt's
    mean step time (alone) is its TTFT over its steps: the short request's TTFT in those steps does not depend on
    how loaded the machine is (about 1.5 = the rest of the step in flight + one full step; the target needs ~1)."""
    import grpc

    from moemesh.v1 import batcher_pb2_grpc

    rng = random.Random(args.seed)
    draw = lambda n: [rng.randrange(200, 40000) for _ in range(n)]  # noqa: E731
    rows = []
    async with grpc.aio.insecure_channel(batcher["address"]) as channel:
        stub = batcher_pb2_grpc.BatcherStub(channel)
        await ttft(stub, draw(64), 2, "warm")
        for rep in range(args.repeats):
            if rep % 2:  # every other repeat runs mixed first: a load that drifts one way favours neither run
                short, mixed = await mixed_run(stub, draw, args, rep)
            before = steps_done(batcher["metrics_port"])
            alone = await ttft(stub, draw(args.long_tokens), 1, f"alone-{rep}")
            step_s = alone / max(1.0, steps_done(batcher["metrics_port"]) - before)
            if not rep % 2:
                short, mixed = await mixed_run(stub, draw, args, rep)
            rows.append({"long_alone_ttft_s": alone, "long_mixed_ttft_s": mixed, "short_ttft_s": short,
                         "long_growth": mixed / alone, "long_step_s": step_s, "short_ttft_steps": short / step_s,
                         "loadavg": os.getloadavg()})
            print(f"repeat {rep + 1}: long alone {alone:.2f} s ({step_s:.2f} s a step), long with the short one "
                  f"{mixed:.2f} s (x{mixed / alone:.2f}), short TTFT {short:.2f} s ({short / step_s:.2f} steps); "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            save(rows)
    return rows


def report(rows: list[dict], args: argparse.Namespace, load_start: tuple, info: dict) -> str:
    keys = ("long_alone_ttft_s", "long_mixed_ttft_s", "long_growth", "short_ttft_s", "long_step_s", "short_ttft_steps")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    lines = ["| repeat | long alone TTFT (s) | long TTFT, short one arriving (s) | growth | short TTFT (s) | "
             "long prompt's step (s) | short TTFT in steps | load 1 min |", "|---|---|---|---|---|---|---|---|"]
    for k, r in [*enumerate(rows, 1), ("median", {**med, "loadavg": ("",)})]:
        cells = [f"{r[x]:.2f}" if x != "long_growth" else f"{r[x] - 1:+.0%}" for x in keys]
        load = r["loadavg"][0]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {load if isinstance(load, str) else f'{load:.1f}'} |")
    verdict = (f"Targets: short TTFT <= 3 s: {'met' if med['short_ttft_s'] <= 3 else 'missed'} (median "
               f"{med['short_ttft_s']:.2f} s); long TTFT growth <= 20%: "
               f"{'met' if med['long_growth'] <= 1.2 else 'missed'} (median {med['long_growth'] - 1:+.0%}).")
    return (f"# A short request during a long prefill (mesh, CPU)\n\n`{info['command']}` on {info['machine']}, "
            f"{info['cpus']} CPUs; `moemesh up --no-auth --model {args.model}` (default batcher knobs); long prompt "
            f"{args.long_tokens} tokens, short {args.short_tokens} tokens sent {args.delay:g} s after it; load "
            f"average (1, 5, 15 min) {_load(load_start)} at the start, {_load(info['loadavg_end'])} at the end "
            f"(2 cores shared with other work: absolute times vary with it)\n\n" + "\n".join(lines) + f"\n\n{verdict}\n")


def _load(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-moe")
    p.add_argument("--long-tokens", type=int, default=7800)
    p.add_argument("--short-tokens", type=int, default=5)
    p.add_argument("--delay", type=float, default=3.0, help="seconds between the long and the short request")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="long-prompt-interleave-cpu")
    args = p.parse_args()
    load_start = os.getloadavg()

    def save(rows: list[dict]) -> None:
        info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
                "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                "args": vars(args)}
        md = report(rows, args, load_start, info)
        out = ROOT / "benchmarks" / "results"
        (out / f"{args.out}.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
        (out / f"{args.out}.md").write_text(md)
        print(md, flush=True)

    with tempfile.TemporaryDirectory(prefix="long-prompt-") as tmp:
        proc, status = start_mesh(args.model, Path(tmp))
        try:
            asyncio.run(measure(status["services"]["batcher"], args, save))
        finally:
            stop_mesh(proc)


if __name__ == "__main__":
    main()
