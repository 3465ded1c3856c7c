"""Chaos under load: `moemesh up` on the tiny model with 16 concurrent streams (moemesh bench's closed loop), then
SIGKILL of each service kind in turn, then SIGSTOP of each for 10 s (SIGCONT after). Per kind and action:

- failed: requests that ended with an error in that phase (status or in-band error chunk);
- to_error_s: longest time from the signal until a failing client saw its error;
- serving_again_s: from the signal until a short chat completes again (probed every 0.5 s);
- ledger_minus_clients: ledger records that completed minus completions the clients saw (ids and tokens; must be 0);
- left_behind: live processes of the killed service's process group once it serves again (must be 0).
At the end the mesh is stopped and every process group it ever had is checked (left_at_end, must be 0).

    .venv/bin/python benchmarks/chaos.py [--kinds tokenizer,batcher,router,expert,metering,gateway] [--stop-s 10]
Writes benchmarks/results/chaos.json and chaos.md (machine, command).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from chaos_parts import Outcome, TrackedBackend, UntilStopped, group_alive, ledger, serving_again  # noqa: E402
from moemesh.bench.load import LoadRun  # noqa: E402
from moemesh.bench.report import machine  # noqa: E402

SERVICES = {"tokenizer": "tokenizer", "batcher": "batcher", "router": "router", "expert": "expert-1",
            "metering": "metering", "gateway": "gateway"}
RESULTS = ROOT / "benchmarks" / "results"


def start_mesh(home: Path, model_dir: Path) -> tuple[subprocess.Popen, Path]:
    status_path = home / "status.json"
    env = {**os.environ, "MOEMESH_HOME": str(home)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    out = (home / "up.out").open("w")
    with socket.socket() as s:  # a fixed port: a restarted gateway comes back where the clients look
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(model_dir),
                             "--gateway-port", str(port), "--status-file", str(status_path)],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not status_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"moemesh up did not start:\n{(home / 'up.out').read_text()[-3000:]}")
        time.sleep(0.3)
    return proc, status_path


def tiny_model() -> Path:
    from moemesh.builtin.tiny import make_tiny_model
    from moemesh.models.registry import resolve_model

    path = Path(tempfile.gettempdir()) / "moemesh-chaos-tiny"
    if not (path / "config.json").exists():
        make_tiny_model(path, tokenizer_from=resolve_model("smollm2", progress=False))
    return path


async def one_phase(kind: str, action: str, backend: TrackedBackend, status_path: Path, stop_s: float,
                    pgids: set[int]) -> dict:
    service = SERVICES[kind]
    pid = json.loads(status_path.read_text())["services"][service]["pid"]
    pgid = os.getpgid(pid)
    pgids.add(pgid)
    t0 = time.monotonic()
    if action == "SIGKILL":
        os.kill(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(stop_s, lambda: _cont(pid))
    back = await serving_again(backend, t0)
    await asyncio.sleep(max(0.0, t0 + stop_s + 1 - time.monotonic()) if action == "SIGSTOP" else 0)
    await asyncio.sleep(8.0)  # streams caught in the fault end; the next phase starts from steady load
    now_pids = {s["pid"] for s in json.loads(status_path.read_text())["services"].values()}
    pgids.update(os.getpgid(p) for p in now_pids if _exists(p))
    left = group_alive(pgid, exclude=now_pids) if action == "SIGKILL" else []
    print(f"{kind:9} {action:7} serving again after {back if back is None else round(back, 1)} s; "
          f"left behind {len(left)}", flush=True)
    return {"kind": kind, "service": service, "action": action, "t0": t0, "t_end": time.monotonic(),
            "serving_again_s": back, "left_behind": len(left)}


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # supervision replaced it meanwhile
        pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def score(phases: list[dict], outcomes: list[Outcome], records: list) -> None:
    """Adds to each phase (a request belongs to the phase it ended in): in_flight_failed (requests running at the
    signal that failed), refused (sent after it and failed; clients pause 0.2 s after a failure), to_error_s, and
    ledger_minus_clients with up to 5 mismatches named."""
    billed = {r.request_id: r for r in records}
    for i, phase in enumerate(phases):
        until = phases[i + 1]["t0"] if i + 1 < len(phases) else float("inf")
        mine = [o for o in outcomes if phase["t0"] <= o.end < until]
        failed = [o for o in mine if not o.completed and not o.probe]
        phase["requests"] = sum(not o.probe for o in mine)
        phase["in_flight_failed"] = sum(o.start < phase["t0"] for o in failed)
        phase["refused"] = len(failed) - phase["in_flight_failed"]
        phase["to_error_s"] = round(max((o.end - phase["t0"] for o in failed), default=0.0), 2)
        phase["errors"] = sorted({o.error.split(":")[0] for o in failed})
        mismatches = [_mismatch(o, billed.get(o.request_id)) for o in mine if o.request_id]
        mismatches = [m for m in mismatches if m]
        phase["ledger_minus_clients"] = sum(m["gap"] for m in mismatches)
        phase["mismatches"] = mismatches[:5]


def _mismatch(o: Outcome, r) -> dict | None:
    """How the ledger differs from what the client saw: +1 a completion the client did not see, -1 the reverse,
    +-tokens when both completed with different counts; None when they agree."""
    ledger_done = r is not None and r.finish_reason in ("stop", "length")
    if ledger_done == o.completed and (not o.completed or r.completion_tokens == o.completion_tokens):
        return None
    gap = (r.completion_tokens - o.completion_tokens) if ledger_done and o.completed else int(ledger_done) - int(
        o.completed)
    return {"request_id": o.request_id, "gap": gap, "client": {"completed": o.completed, "tokens":
            o.completion_tokens, "error": o.error[:120], "probe": o.probe},
            "ledger": None if r is None else {"finish": r.finish_reason, "tokens": r.completion_tokens}}


async def run(args: argparse.Namespace) -> dict:
    home = Path(tempfile.mkdtemp(prefix="moemesh-chaos-"))
    proc, status_path = start_mesh(home, tiny_model())
    status = json.loads(status_path.read_text())
    pgids = {os.getpgid(s["pid"]) for s in status["services"].values()}
    backend = TrackedBackend(status["gateway"], status["api_key"], status["model"], 120.0)
    spec = UntilStopped(concurrency=args.streams, requests=None, duration_s=1e9, prompt_tokens=32,
                        max_tokens=48, ignore_eos=True)
    load = asyncio.create_task(LoadRun(backend, spec).run())
    phases: list[dict] = []
    try:
        await asyncio.sleep(args.warmup_s)
        for action in ("SIGKILL", "SIGSTOP"):
            for kind in args.kinds:
                phases.append(await one_phase(kind, action, backend, status_path, args.stop_s, pgids))
    finally:
        spec.stop.set()
        records, duration = await load
    await asyncio.sleep(5.0)  # commits retried after a metering restart land
    billed = await asyncio.to_thread(ledger, status["services"]["metering"]["address"], home)
    score(phases, backend.outcomes, billed)
    restarts = {n: s.get("restarts", 0) for n, s in json.loads(status_path.read_text())["services"].items()}
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    await asyncio.sleep(2.0)
    left_at_end = sum(len(group_alive(g)) for g in pgids | {proc.pid})
    ids = [r.request_id for r in billed]
    return {"phases": phases, "requests": len(backend.outcomes), "duration_s": round(duration, 1),
            "duplicate_ledger_ids": len(ids) - len(set(ids)), "left_at_end": left_at_end, "restarts": restarts,
            "load": {"streams": args.streams, "prompt_tokens": 32, "max_tokens": 48}, "mesh_home": str(home)}


def write(doc: dict, argv: list[str]) -> None:
    doc.update(machine=machine(), command=" ".join([".venv/bin/python", "benchmarks/chaos.py", *argv]),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = ["| service | signal | requests | in flight failed | refused while down | errors seen | to error (s) | "
            "serving again (s) | ledger - clients | left behind |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["phases"]:
        back = "not within 90" if p["serving_again_s"] is None else f"{p['serving_again_s']:.1f}"
        rows.append(f"| {p['service']} | {p['action']} | {p['requests']} | {p['in_flight_failed']} | {p['refused']} | "
                    f"{', '.join(p['errors']) or '-'} | {p['to_error_s']:.1f} | {back} | "
                    f"{p['ledger_minus_clients']} | {p['left_behind']} |")
    m = doc["machine"]
    text = "\n".join([
        "# Chaos under load", "", f"Command: `{doc['command']}` ({doc['date']})", "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs (shared), load average {m['loadavg']}, commit "
        f"{m['git_commit']}. Tiny MoE model, {doc['load']['streams']} concurrent streams (closed loop), "
        f"{doc['requests']} requests in {doc['duration_s']} s.", "", *rows, "",
        f"Duplicate ledger records: {doc['duplicate_ledger_ids']}. Processes left after the mesh stopped: "
        f"{doc['left_at_end']}. Restarts: {doc['restarts']}.", ""])
    (RESULTS / "chaos.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", type=lambda s: s.split(","), default=list(SERVICES))
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stop-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=10.0)
    doc = asyncio.run(run(p.parse_args(argv)))
    write(doc, argv)
    bad = doc["left_at_end"] or any(p["ledger_minus_clients"] or p["left_behind"] or p["serving_again_s"] is None
                                    for p in doc["phases"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
