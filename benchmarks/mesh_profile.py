"""Where a streamed token's CPU goes in the mesh: CPU ms per generated token per process, and the router's gaps.

    python benchmarks/mesh_profile.py [--model smollm2-moe] [--tokens 24] [--py-spy DIR] [--cprofile DIR] [--up ARGS]

Starts `moemesh up` like benchmarks/mesh_decode.py (temporary MOEMESH_HOME, shm transport), then for concurrency 1
and 8: reads utime+stime of every mesh process (/proc/<pid>/stat, threads included) around the streams, and divides
by the completion tokens streamed; then streams again and reads the CPU over the decode only (from every stream's
second chunk on: no prefill). The router's "router.step" spans (MOEMESH_HOME/traces/router.jsonl) give its busy
time per step and the idle gap between one step's end and the next one's start (the time the router waits for the
batcher), split into legs with the Router/Step server span and the batcher's "batcher.step" span. The idle mesh's CPU
(10 s before any request) comes first. With --py-spy DIR, every process is also sampled by `py-spy record`
(speedscope files in DIR). With --cprofile DIR, the front end's services (batcher, gateway, tokenizer, metering)
run cProfile on their event loop's thread over the decode-only window (benchmarks/cprofile_hook/sitecustomize.py,
started and stopped by signals): DIR/<service>-c<concurrency>.prof, and each one's top functions per token in the
report. CPU is read from every thread's run time in ns (/proc/<pid>/task/*/schedstat), not in 10 ms ticks.
--pipeline off disables the batcher's step pipelining (MOEMESH_BATCHER_PIPELINE=false), to compare; --spin N sets the
shards' shared-memory poll window (MOEMESH_EXPERT_SPIN_US, microseconds; 0: block at once; -1: auto; default: unset).
Writes benchmarks/results/mesh-profile-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from frontend_cprofile import PROFILED, collect_profiles, cprofile_env, profile_lines  # noqa: E402
from mesh_decode import PROMPT, mesh_streams, start_mesh, stop_mesh  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds of the process: the sum of its live threads' run time in ns (/proc/<pid>/task/*/schedstat), not
    utime + stime in 10 ms ticks (at 64 tokens a tick is 0.16 ms per token: coarser than the front end's costs).
    A thread that ended meanwhile is missed; the services' threads live as long as they do."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    if total:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def router_steps(traces: Path, since_ns: int) -> list[tuple[int, int, int, int]]:
    """(start, end, sequences, step id) of every router.step span after since_ns, by start. Steps are traced only
    in part (services/batcher/router_client.py, Sampling): every step with MOEMESH_BATCHER_TRACE_EVERY=1."""
    flush_wait = time.monotonic() + 2
    while time.monotonic() < flush_wait:  # the BatchSpanProcessor exports every 200 ms
        time.sleep(0.5)
    out = []
    path = traces / "router.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        span = json.loads(line)
        if span["name"] == "router.step" and span["start"] >= since_ns:
            attributes = span["attributes"]
            out.append((span["start"], span["end"], attributes.get("moemesh.sequences", 0),
                        attributes.get("moemesh.step_id", -1)))
    return sorted(out)


def _spans(traces: Path, service: str, since_ns: int) -> list[dict]:
    path = traces / f"{service}.jsonl"
    spans = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [s for s in spans if s["start"] >= since_ns]


def gap_parts(traces: Path, since_ns: int) -> dict:
    """Median ms of each leg between one router.step's end and the next one's start, from the spans of the router
    (router.step, its Router/Step server span) and the batcher (batcher.step, its Step client span)."""
    router, batcher = _spans(traces, "router", since_ns), _spans(traces, "batcher", since_ns)
    by_id = {s["span_id"]: s for s in router}
    steps = {}  # step_id -> {name: span}
    for s in router:
        if s["name"] == "router.step":
            server = by_id.get(s["parent_id"])
            steps.setdefault(s["attributes"]["moemesh.step_id"], {}).update(rstep=s, server=server)
    for s in batcher:
        if s["name"] == "batcher.step":
            steps.setdefault(s["attributes"]["moemesh.step_id"], {})["bstep"] = s
    legs = {"router_reply": [], "to_batcher": [], "batcher_turn": [], "to_router": [], "router_request": [],
            "next_request_lead": []}
    ids = sorted(i for i, v in steps.items() if len(v) == 3 and v["server"] is not None)
    for a, b in zip(ids, ids[1:]):
        x, y = steps[a], steps[b]
        if b != a + 1:
            continue
        legs["router_reply"].append(x["server"]["end"] - x["rstep"]["end"])
        legs["to_batcher"].append(x["bstep"]["end"] - x["server"]["end"])
        legs["batcher_turn"].append(y["bstep"]["start"] - x["bstep"]["end"])
        legs["to_router"].append(y["server"]["start"] - y["bstep"]["start"])
        legs["router_request"].append(y["rstep"]["start"] - y["server"]["start"])
        # > 0: the next Step was already at the router when this one ended (pipelined); < 0: the router waited
        legs["next_request_lead"].append(x["rstep"]["end"] - y["server"]["start"])
    return {k: statistics.median(v) / 1e6 for k, v in legs.items() if v}


def gaps(steps: list[tuple[int, int, int, int]]) -> dict:
    """Busy ms per traced step; idle ms between two traced steps only when they are consecutive (step ids)."""
    busy = [(e - s) / 1e6 for s, e, _, _ in steps]
    idle = [(b[0] - a[1]) / 1e6 for a, b in zip(steps, steps[1:]) if b[3] == a[3] + 1]
    if not busy:
        return {}
    return {"steps": len(steps), "step_ms_median": statistics.median(busy),
            "gap_ms_median": statistics.median(idle) if idle else 0.0,
            "gap_ms_mean": statistics.mean(idle) if idle else 0.0,
            "gap_ms_p90": sorted(idle)[int(0.9 * len(idle))] if idle else 0.0}


async def decode_cpu(gateway: str, pids: dict[str, int], concurrency: int, tokens: int,
                     on_mark=lambda name: None) -> tuple[list[float], dict]:
    """Streams like mesh_decode.mesh_streams; CPU seconds of every process between the moment every stream has its
    second chunk and the moment the streams together have (tokens - 1) x concurrency chunks: decode only, no
    prefill. on_mark("a") / on_mark("b") run at those two moments (cProfile start / stop). Returns (ms/token per
    stream, {"tokens": chunks in between, "cpu": {name: seconds}})."""
    import grpc

    from moemesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2

    seen, marks = [0], {}

    async def one(stub, model: str) -> float:
        request = chat_pb2.ChatCompletionRequest(
            model=model, messages=[common_pb2.ChatMessage(role="user", content=PROMPT)], max_tokens=tokens,
            temperature=0.0, ignore_eos=True)
        stamps = []
        async for chunk in stub.StreamChatCompletion(request, timeout=600):
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
                seen[0] += 1
                for name, at in (("a", 2 * concurrency), ("b", (tokens - 1) * concurrency)):
                    if seen[0] == at:
                        marks[name] = (seen[0], {n: cpu_seconds(p) for n, p in pids.items()})
                        on_mark(name)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000

    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        model = (await stub.ListModels(chat_pb2.ListModelsRequest(), timeout=30)).data[0].id
        per_stream = await asyncio.gather(*(one(stub, model) for _ in range(concurrency)))
    (na, a), (nb, b) = marks["a"], marks["b"]
    return list(per_stream), {"tokens": nb - na, "cpu": {n: b[n] - a[n] for n in pids}}


def run_load(gateway: str, pids: dict[str, int], concurrency: int, tokens: int, traces: Path,
             spy_dir: Path | None, cprofile: Path | None = None) -> dict:
    spies = []
    if spy_dir is not None:
        spy_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = spy_dir / f"{name}-c{concurrency}.speedscope.json"
            spies.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "250",
                 "--format", "speedscope", "--nonblocking", "--output", str(out), "--threads"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
    before = {n: cpu_seconds(p) for n, p in pids.items()}
    since, start = time.time_ns(), time.perf_counter()
    per_stream = asyncio.run(mesh_streams(gateway, concurrency, tokens))
    wall = time.perf_counter() - start
    after = {n: cpu_seconds(p) for n, p in pids.items()}
    profiled = {n: p for n, p in pids.items() if n in PROFILED} if cprofile else {}
    _, decode = asyncio.run(decode_cpu(gateway, pids, concurrency, tokens, lambda mark: [
        os.kill(pid, signal.SIGUSR1 if mark == "a" else signal.SIGUSR2) for pid in profiled.values()]))
    profiles = collect_profiles(cprofile, profiled, concurrency, decode["tokens"]) if profiled else {}
    for spy in spies:
        spy.send_signal(2)
    for spy in spies:
        spy.wait(60)
    generated = concurrency * tokens + 4  # + the warm-up stream's 4 tokens
    cpu_ms = {n: (after[n] - before[n]) * 1000 / generated for n in pids}
    return {"concurrency": concurrency, "ms_per_token": statistics.median(per_stream), "wall_s": wall,
            "cpu_ms_per_token": cpu_ms, "cpu_ms_per_token_total": sum(cpu_ms.values()),
            "decode_cpu_ms_per_token": {n: c * 1000 / decode["tokens"] for n, c in decode["cpu"].items()},
            "router_steps": gaps(router_steps(traces, since)), "gap_legs_ms": gap_parts(traces, since),
            "cprofile_top": profiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-moe")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--transport", default="shm")
    parser.add_argument("--pipeline", choices=("on", "off"), default="on",
                        help="batcher step pipelining (MOEMESH_BATCHER_PIPELINE); with it on, the router's gap is "
                             "only its own turn-around: the next step is already queued")
    parser.add_argument("--spin", default="default", help="shard shm poll window in us (default, 0, 2000, -1)")
    parser.add_argument("--py-spy", type=Path, default=None)
    parser.add_argument("--up", default="", help="more `moemesh up` arguments, e.g. '--backend packed' (make run's)")
    parser.add_argument("--cprofile", type=Path, default=None, metavar="DIR",
                        help="cProfile the front end's services over the decode-only window (their main thread); "
                        ".prof files and each one's top functions per token in DIR")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mesh-profile-cpu")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    rows, idle = [], {}
    with tempfile.TemporaryDirectory(prefix="mesh-profile-") as tmp:
        proc, status = start_mesh(args.model, args.transport, Path(tmp), args.pipeline == "on", args.spin,
                                  cprofile_env(args.cprofile), shlex.split(args.up))
        try:
            pids = {n: s["pid"] for n, s in status["services"].items()}
            traces = Path(tmp) / "home" / "traces"
            before = {n: cpu_seconds(p) for n, p in pids.items()}
            time.sleep(10)
            idle = {n: (cpu_seconds(p) - before[n]) * 100 for n, p in pids.items()}  # % of one core
            for concurrency in (1, 8):
                rows.append(run_load(status["gateway"], pids, concurrency, args.tokens, traces, args.py_spy,
                                     args.cprofile))
        finally:
            stop_mesh(proc)
    md = render(rows, idle, args, load_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "load_average_start": load_start,
               "load_average_end": os.getloadavg()[0], "pipeline": args.pipeline, "spin": args.spin}
    args.out.with_suffix(".json").write_text(json.dumps({"command": _command(), "machine": machine,
                                                         "idle_core_percent": idle, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


def _command() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                 else sys.argv[0], *sys.argv[1:]])


def render(rows: list[dict], idle: dict, args: argparse.Namespace, load_start: float) -> str:
    order = ["router", "expert-0", "expert-1", "batcher", "gateway", "tokenizer", "metering"]
    names = sorted(rows[0]["cpu_ms_per_token"], key=lambda n: order.index(n) if n in order else len(order))
    table = ["| concurrency | ms/token | " + " | ".join(names) + " | total CPU | router step ms | router gap ms "
             "(median / mean) |", "|---" * (len(names) + 5) + "|"]
    for r in rows:
        g = r["router_steps"]
        table.append(f"| {r['concurrency']} | {r['ms_per_token']:.1f} | "
                     + " | ".join(f"{r['cpu_ms_per_token'][n]:.1f}" for n in names)
                     + f" | {r['cpu_ms_per_token_total']:.1f} | {g.get('step_ms_median', 0):.1f} | "
                     f"{g.get('gap_ms_median', 0):.1f} / {g.get('gap_ms_mean', 0):.1f} |")
    table += ["", "Decode only (no prefill), CPU ms per token:", "",
              "| concurrency | " + " | ".join(names) + " | total |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        d = r["decode_cpu_ms_per_token"]
        table.append(f"| {r['concurrency']} | " + " | ".join(f"{d[n]:.1f}" for n in names)
                     + f" | {sum(d.values()):.1f} |")
    table += ["", "Idle mesh, % of one core over 10 s: " + ", ".join(f"{n} {idle[n]:.1f}" for n in names)]
    table += ["", "Router gap legs, median ms (router reply -> batcher -> batcher turn -> router -> router request; "
              "pipelined, batcher_turn is negative: the next step left before this one's result came back; "
              "next_request_lead: how long before this step's end the next Step reached the router):", ""] + [f"- concurrency {r['concurrency']}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                             r["gap_legs_ms"].items()) for r in rows]
    table += profile_lines(rows)
    return "\n".join([f"# CPU ms per streamed token per mesh process ({args.model}, {args.tokens} tokens)", "",
                      f"Command: `{_command()}`; {os.cpu_count()} cores; load average {load_start:.2f} at start, "
                      f"{os.getloadavg()[0]:.2f} at end.", "", *table, "",
                      "CPU ms per token: utime+stime of the process over the run (prefills included) / completion "
                      "tokens streamed. Router gap: from the end of one router.step span to the start of the next "
                      "(waiting for the batcher).", ""])


if __name__ == "__main__":
    main()
