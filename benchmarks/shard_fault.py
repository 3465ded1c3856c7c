"""An expert shard killed or stopped mid-stream, per expert transport: `moemesh up --expert-transport T` on the tiny
MoE model with `--streams` streaming clients in a closed loop, then SIGKILL of expert-0 (`moemesh up` restarts it),
then SIGSTOP of expert-0 for `--stop-s` seconds (SIGCONT after). Per transport and signal:

- in_flight: requests streaming at the signal; failed / completed of them (completed: the fault missed them, or the
  batcher re-ran their step);
- first_error_s, to_error_s: from the signal to the first / the last error an in-flight client saw (target <= 1 s);
- hung: in-flight requests still open 30 s after the signal (must be 0);
- shard_back_s: from the signal until the shard is back (SIGKILL: `moemesh up` reports the new process SERVING;
  SIGSTOP: the SIGCONT); serving_again_s: from the signal until a short chat completes (probed every 0.5 s);
  again_after_back_s = serving_again_s - shard_back_s (target <= 30 s);
- left_behind: live processes of the killed shard's process group once the mesh serves again (must be 0).
At the end each mesh is stopped and every process group it ever had is checked (left_at_end, must be 0).
Transports "shm+replicas", "dist+replicas": that transport with a placement file putting every expert on both
shards, so the router routes around the lost shard (serving again before the shard is back).

    .venv/bin/python benchmarks/shard_fault.py [--transports shm,dist,grpc,shm+replicas,dist+replicas] [--streams 4]
        [--stop-s 5]
Writes benchmarks/results/shard-fault-cpu.json and .md (machine, command, load average).
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

from chaos import tiny_model  # noqa: E402
from chaos_parts import TrackedBackend, UntilStopped, group_alive, serving_again  # noqa: E402
from moemesh.bench.load import LoadRun  # noqa: E402
from moemesh.bench.report import machine  # noqa: E402
from tests.mesh_process import free_port, stop_mesh, wait_status  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARD = "expert-0"
HUNG_S = 30.0


def start_mesh(home: Path, model: Path, transport: str) -> tuple[subprocess.Popen, Path]:
    status_path, output = home / "status.json", home / "up.out"
    extra = ["--expert-transport", transport]
    if transport.endswith("+replicas"):  # every expert on both shards
        from moemesh.runtime import placement_plan

        experts = json.loads((model / "config.json").read_text())["num_local_experts"]
        placement_plan.write(home / "placement.json", [list(range(experts))] * 2, experts, "shard_fault",
                             {0: [1.0] * experts})
        extra = ["--expert-transport", transport.split("+")[0], "--placement", str(home / "placement.json")]
    env = {**os.environ, "MOEMESH_HOME": str(home), "OTEL_SDK_DISABLED": "true"}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with output.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(model),
                                 "--gateway-port", str(free_port()), "--status-file", str(status_path),
                                 "--dashboard-port", "-1", *extra],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_status(proc, status_path, output, 300)
    return proc, status_path


def _status(path: Path) -> dict:
    return json.loads(path.read_text())


async def _shard_back(status_path: Path, old_pid: int, since: float, limit_s: float = 120.0) -> float | None:
    """Seconds from `since` until the status file names a new pid for the shard (written once it is SERVING)."""
    while time.monotonic() - since < limit_s:
        try:
            if _status(status_path)["services"][SHARD]["pid"] != old_pid:
                return time.monotonic() - since
        except (OSError, ValueError):  # being rewritten
            pass
        await asyncio.sleep(0.1)
    return None


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # supervision replaced it meanwhile
        pass


async def one_phase(action: str, backend: TrackedBackend, status_path: Path, stop_s: float, pgids: set) -> dict:
    pid = _status(status_path)["services"][SHARD]["pid"]
    pgid = os.getpgid(pid)
    pgids.add(pgid)
    in_flight = [o for o in backend.outcomes if not o.end and not o.probe]
    t0 = time.monotonic()
    if action == "SIGKILL":
        os.kill(pid, signal.SIGKILL)
        back = asyncio.create_task(_shard_back(status_path, pid, t0))
    else:
        os.kill(pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(stop_s, lambda: _cont(pid))
        back = asyncio.create_task(asyncio.sleep(stop_s, result=stop_s))
    again = await serving_again(backend, t0, limit_s=120.0)
    shard_back = await back
    await asyncio.sleep(max(0.0, t0 + HUNG_S - time.monotonic()))  # in-flight requests end (or count as hung)
    now_pids = {s["pid"] for s in _status(status_path)["services"].values()}
    pgids.update(os.getpgid(p) for p in now_pids if _alive(p))
    left = group_alive(pgid, exclude=now_pids) if action == "SIGKILL" else []
    failed = [o.end - t0 for o in in_flight if o.end and not o.completed]
    row = {"action": action, "in_flight": len(in_flight), "failed": len(failed),
           "completed": sum(o.completed for o in in_flight), "hung": sum(not o.end for o in in_flight),
           "first_error_s": round(min(failed), 2) if failed else None,
           "to_error_s": round(max(failed), 2) if failed else None,
           "errors": sorted({o.error.split(":")[0] for o in in_flight if o.error}),
           "error_sample": next((o.error[:200] for o in in_flight if o.error), ""),
           "shard_back_s": None if shard_back is None else round(shard_back, 2),
           "serving_again_s": None if again is None else round(again, 2),
           "again_after_back_s": None if again is None or shard_back is None else round(max(again - shard_back,
                                                                                                0.0), 2),
           "left_behind": len(left)}
    print(json.dumps(row), flush=True)
    return row


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


async def one_transport(transport: str, args: argparse.Namespace) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"moemesh-fault-{transport.replace('+', '-')}-"))
    proc, status_path = start_mesh(home, tiny_model(), transport)
    status = _status(status_path)
    pgids = {os.getpgid(s["pid"]) for s in status["services"].values()}
    backend = TrackedBackend(status["gateway"], status["api_key"], status["model"], 120.0)
    spec = UntilStopped(concurrency=args.streams, requests=None, duration_s=1e9, prompt_tokens=32,
                        max_tokens=args.max_tokens, ignore_eos=True)
    load = asyncio.create_task(LoadRun(backend, spec).run())
    rows = []
    try:
        await asyncio.sleep(args.warmup_s)
        for action in ("SIGKILL", "SIGSTOP"):
            rows.append({"transport": transport, **await one_phase(action, backend, status_path, args.stop_s,
                                                                     pgids)})
    finally:
        spec.stop.set()
        await load
        await backend.close()
        stop_mesh(proc)
    await asyncio.sleep(2.0)
    left_at_end = sum(len(group_alive(g)) for g in pgids | {proc.pid})
    return {"transport": transport, "phases": rows, "left_at_end": left_at_end, "mesh_home": str(home)}


def write(doc: dict, argv: list[str]) -> None:
    doc.update(machine=machine(), command=" ".join([".venv/bin/python", "benchmarks/shard_fault.py", *argv]),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shard-fault-cpu.json").write_text(json.dumps(doc, indent=2) + "\n")

    def s(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = ["| transport | signal | in flight | failed | completed | hung | first error (s) | last error (s) | "
            "shard back (s) | serving again (s) | again after back (s) | left behind |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in doc["transports"]:
        for p in t["phases"]:
            rows.append(f"| {p['transport']} | {p['action']} | {p['in_flight']} | {p['failed']} | {p['completed']} | "
                        f"{p['hung']} | {s(p['first_error_s'])} | {s(p['to_error_s'])} | {s(p['shard_back_s'])} | "
                        f"{s(p['serving_again_s'])} | {s(p['again_after_back_s'])} | {p['left_behind']} |")
    m = doc["machine"]
    samples = [f"- {p['transport']} {p['action']}: `{p['error_sample']}`" for t in doc["transports"]
               for p in t["phases"] if p["error_sample"]]
    text = "\n".join([
        "# Expert shard killed or stopped mid-stream (CPU mesh)", "", f"Command: `{doc['command']}` ({doc['date']})",
        "", f"Machine: {m['platform']}, {m['cpus']} CPUs (shared), load average at the end {m['loadavg']}, commit "
        f"{m['git_commit']}. Tiny MoE model, {doc['streams']} streaming clients (closed loop, {doc['max_tokens']} "
        f"tokens each), SIGSTOP held {doc['stop_s']} s. Times from the signal; 'again after back' is from the "
        "shard's return (new process SERVING, or SIGCONT).", "", *rows, "",
        "Processes left after each mesh stopped: " + ", ".join(f"{t['transport']} {t['left_at_end']}"
                                                               for t in doc["transports"]) + ".", "",
        "First error each client saw:", *samples, ""])
    (RESULTS / "shard-fault-cpu.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", type=lambda s: s.split(","),
                   default=["shm", "dist", "grpc", "shm+replicas", "dist+replicas"])
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--stop-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    args = p.parse_args(argv)
    transports = [asyncio.run(one_transport(t, args)) for t in args.transports]
    doc = {"transports": transports, "streams": args.streams, "max_tokens": args.max_tokens, "stop_s": args.stop_s}
    write(doc, argv)
    bad = any(t["left_at_end"] or any(p["hung"] or p["left_behind"] or p["serving_again_s"] is None
                                      for p in t["phases"]) for t in transports)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
