"""Streamed decode through the mesh (`moemesh up`) against the in-process Engine, same model, same machine, one run.

    python benchmarks/mesh_decode.py [--model smollm2-moe] [--tokens 64] [--transports shm] [--pipeline on]
                                     [--spin default,0] [--threads 1,2] [--repeats 1] [--env-variant 'K=V ...']
                                     [--up-variant 'MOEMESH UP ARGS']

In process: Engine.load(model) in this process (OMP_WAIT_POLICY=PASSIVE unless set, recorded in the JSON), the
chat-templated prompt the gateway renders, one prefill step, then `tokens` greedy decode steps (ignore_eos) at batch 1
and batch 8, once per torch thread count in --threads (default 1 and torch's default, every core); ms/step is the
median step. No mesh process runs meanwhile. Mesh: `moemesh up --no-auth` in a temporary MOEMESH_HOME (models from
the usual cache) with MOEMESH_ROUTER_EXPERT_TRANSPORT=<transport> and MOEMESH_BATCHER_PIPELINE on/off, then
StreamChatCompletion through the gateway (greedy, ignore_eos, max_tokens=tokens): 1 stream, then 8 concurrent
streams. ms/token of a stream = (last chunk - first chunk) / (completion tokens - 1): the decode pace a client sees
(prefill and time to first token excluded); the table shows the median over streams, tok/s = streams x 1000 / that.
ratio = the in-process engine's best ms/step (its fastest thread count, per batch) / mesh ms/token at the same batch
(1.0: the mesh decodes as fast as its own engine at its best). --spin sets the shards' shared-memory poll window
(MOEMESH_EXPERT_SPIN_US: default = not set, 0 = block at once, N = poll N microseconds, -1 = auto: 2000 us on the
shards that leave a core for the router, shard 0 of 2 on 2 cores; one mesh per value, with pipelining on): by default
the shipped setting (auto) and 0 (--pipeline on,off adds a row without batcher pipelining). Runs are interleaved per
repeat (engine, then each
mesh variant) so that load from other work on the machine spreads over all rows. --env-variant adds a mesh row with
those env settings (e.g. MOEMESH_FRONTEND_NICE=0), --up-variant one started with further `moemesh up` arguments (e.g.
'--backend onnxruntime --expert-shards 0'; leading K=V words are its environment: 'MOEMESH_EXPERT_SPIN_US=0 --backend packed'). A second table gives each mesh process's CPU ms per streamed token
(utime + stime over the streams): where the mesh's CPU goes, and a figure that other load on the machine moves less
than wall time. Defaults take about 4 minutes on
2 cores at --repeats 2. Writes benchmarks/results/mesh-decode-cpu.json and .md (machine, load average, command).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Same OpenMP settings in process as `moemesh up` gives its compute processes (moemesh/cli/data_plane.py), set before
# torch loads libgomp: with libgomp's default (spinning workers) a 2-core machine shared with other work made the
# in-process decode step 7x slower (about 290 vs 39 ms), which would flatter the mesh. An explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.mesh_process import stop_mesh  # noqa: E402
PROMPT = ("Write a long story about a lighthouse keeper who finds a message in a bottle, with many details about the "
          "sea, the weather and the village.")


def engine_decode(model: str, batch: int, tokens: int, threads: int, backend: str = "torch") -> float:
    """Median ms of one decode step of `batch` sequences through Engine.step with `threads` torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _engine_decode(model, batch, tokens, backend)
    finally:
        torch.set_num_threads(before)


def _engine_decode(model: str, batch: int, tokens: int, backend: str) -> float:
    from moemesh.models.registry import resolve_model
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.types import SamplingParams, SequenceWork
    from moemesh.tokenization.chat_tokenizer import ChatTokenizer

    global _ENGINE
    model_dir = resolve_model(model)
    if "_ENGINE" not in globals():
        _ENGINE = Engine.load(model_dir, kv_blocks=256, backend=backend)
    # The same chat-templated prompt the gateway renders for the mesh's request (same prompt length, same tokens).
    ids, _ = ChatTokenizer.load(model_dir).encode_chat([{"role": "user", "content": PROMPT}])
    sampling = SamplingParams(max_tokens=tokens + 1, ignore_eos=True)
    results = _ENGINE.step([SequenceWork(f"s{i}", ids, 0, sampling) for i in range(batch)])
    times, position = [], len(ids)
    for _ in range(tokens):
        works = [SequenceWork(f"s{i}", [r.token_id], position, sampling) for i, r in enumerate(results)]
        start = time.perf_counter()
        results = _ENGINE.step(works)
        times.append(time.perf_counter() - start)
        position += 1
    _ENGINE.release([f"s{i}" for i in range(batch)])
    return statistics.median(times) * 1000


async def _stream(stub, model: str, tokens: int) -> tuple[int, float]:
    from moemesh.v1 import chat_pb2, common_pb2

    request = chat_pb2.ChatCompletionRequest(
        model=model, messages=[common_pb2.ChatMessage(role="user", content=PROMPT)], max_tokens=tokens,
        temperature=0.0, ignore_eos=True, stream_options=chat_pb2.StreamOptions(include_usage=True))
    stamps, completion = [], 0
    async for chunk in stub.StreamChatCompletion(request, timeout=600):
        if chunk.HasField("error"):
            raise RuntimeError(f"stream failed: {chunk.error.code}: {chunk.error.message}")
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.HasField("usage"):
            completion = chunk.usage.completion_tokens
    if completion < 2 or len(stamps) < 2:
        raise RuntimeError(f"only {completion} tokens streamed")
    return completion, (stamps[-1] - stamps[0]) / (completion - 1) * 1000


async def mesh_streams(gateway: str, concurrency: int, tokens: int, pids: dict[str, int] | None = None,
                       cpu_out: dict[str, float] | None = None) -> list[float]:
    """ms/token of each of `concurrency` simultaneous streams; with `pids`, cpu_out gets each process's CPU ms per
    streamed token (utime + stime over the streams, whatever core it ran on; other load moves it less than wall
    time)."""
    import grpc

    from moemesh.v1 import chat_pb2, chat_pb2_grpc

    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        model = (await stub.ListModels(chat_pb2.ListModelsRequest(), timeout=30)).data[0].id
        await _stream(stub, model, 4)  # warm-up: first-use costs out of the figures
        before = cpu_seconds(pids or {})
        done = await asyncio.gather(*(_stream(stub, model, tokens) for _ in range(concurrency)))
        after = cpu_seconds(pids or {})
    streamed = sum(n for n, _ in done)
    if cpu_out is not None:
        cpu_out.update({k: (after[k] - before[k]) * 1000 / streamed for k in after if k in before})
    return [ms for _, ms in done]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime of each process, in seconds (Linux /proc; clock ticks of 10 ms)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def start_mesh(model: str, transport: str, workdir: Path, pipeline: bool = True,
               spin: str = "default", extra_env: dict[str, str] | None = None,
               up_args: list[str] | None = None) -> tuple[subprocess.Popen, dict]:
    from moemesh import home
    from tests.mesh_process import free_port, wait_status

    env = {**os.environ, "MOEMESH_HOME": str(workdir / "home"), "MOEMESH_ROUTER_EXPERT_TRANSPORT": transport,
           "MOEMESH_MODELS": os.environ.get("MOEMESH_MODELS") or str(home.models_dir()),
           "MOEMESH_BATCHER_PIPELINE": "true" if pipeline else "false", **(extra_env or {})}
    if spin != "default":  # the expert shards' shm poll window (services/expert/config.py spin_us)
        env["MOEMESH_EXPERT_SPIN_US"] = spin
    status, log = workdir / f"status-{transport}.json", workdir / f"up-{transport}.log"
    cmd = [sys.executable, "-m", "moemesh.cli.main", "up", "--model", model, "--no-auth", "--gateway-port",
           str(free_port()), "--status-file", str(status), *(up_args or [])]
    help_text = subprocess.run([*cmd[:4], "--help"], capture_output=True, text=True, env=env).stdout
    if "--dashboard-port" in help_text:
        cmd += ["--dashboard-port", "-1"]  # no scraping while timing
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    return proc, wait_status(proc, status, log, timeout_s=900)


def measure(args: argparse.Namespace) -> dict:
    """Interleaved: per repeat, the in-process engine at each thread count, then each mesh variant."""
    rows: dict[str, dict] = {}
    variants = [(t, p, "default", "", "") for t in args.transports.split(",") for p in args.pipeline.split(",")]
    variants += [(t, "on", spin, "", "") for t in args.transports.split(",") for spin in args.spin.split(",")
                 if spin != "default"]
    variants += [(t, "on", "default", e, "") for t in args.transports.split(",") for e in args.env_variant]
    variants += [(t, "on", "default", "", u) for t in args.transports.split(",") for u in args.up_variant]
    for rep in range(args.repeats):
        for threads in args.threads:
            backend = "" if args.engine_backend == "torch" else f", backend {args.engine_backend}"
            row = rows.setdefault(f"in-process{backend}, {threads} thread{'s' if threads > 1 else ''}",
                                  {"batch1": [], "batch8": [], "threads": threads})
            for batch in (1, 8):
                row[f"batch{batch}"].append(engine_decode(args.model, batch, args.tokens, threads,
                                                          args.engine_backend))
        for transport, pipeline, spin, extra, up in variants:
            name = f"mesh {transport}" + ("" if pipeline == "on" else ", no pipelining") + (
                "" if spin == "default" else f", MOEMESH_EXPERT_SPIN_US={spin}") + (f", {extra}" if extra else "") + (
                f", up {up}" if up else "")
            up_env = [w for w in shlex.split(up) if re.fullmatch(r"[A-Z_]+=.*", w)]  # leading K=V: its env
            with tempfile.TemporaryDirectory(prefix="mesh-decode-") as tmp:
                proc, status = start_mesh(args.model, transport, Path(tmp), pipeline == "on", spin,
                                          dict(kv.split("=", 1) for kv in [*extra.split(), *up_env]),
                                          [w for w in shlex.split(up) if w not in up_env])
                try:
                    row = rows.setdefault(name, {"batch1": [], "batch8": []})
                    row["transports"] = {n: s.get("transport") for n, s in status["services"].items()
                                         if n.startswith("expert-")}
                    pids = {n: s["pid"] for n, s in status["services"].items()}
                    for concurrency in (1, 8):
                        cpu: dict[str, float] = {}
                        per_stream = asyncio.run(mesh_streams(status["gateway"], concurrency, args.tokens, pids, cpu))
                        row[f"batch{concurrency}"].append(statistics.median(per_stream))
                        row.setdefault(f"cpu_ms_per_token_batch{concurrency}", []).append(cpu)
                finally:
                    stop_mesh(proc)
        print(f"repeat {rep + 1}/{args.repeats} (load {os.getloadavg()[0]:.2f}): " + json.dumps(
            {k: {b: round(v[b][-1], 1) for b in ("batch1", "batch8")} for k, v in rows.items()}), flush=True)
    return rows


def report(rows: dict, args: argparse.Namespace, load_start: float) -> tuple[dict, str]:
    # The baseline is the in-process engine at its best thread count for each batch (honest: on 2 loaded cores one
    # torch thread is often faster than the default of every core).
    engines = [row for name, row in rows.items() if name.startswith("in-process")]
    base = {b: min(statistics.median(row[b]) for row in engines) for b in ("batch1", "batch8")}
    table = ["| where | transport | batch 1 ms/token | batch 1 tok/s | ratio | batch 8 ms/token | batch 8 tok/s | "
             "ratio |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, row in rows.items():
        ms = {b: statistics.median(row[b]) for b in ("batch1", "batch8")}
        ratio = {b: base[b] / ms[b] for b in ms}
        transport = ",".join(sorted(set((row.get("transports") or {}).values()))) or "in process"
        if "threads" in row:  # best thread count first in the table's meaning: ratio 1.00 marks the baseline
            transport += f", {row['threads']} torch thread{'s' if row['threads'] > 1 else ''}"
        summary[name] = {"ms_per_token": ms, "tok_per_s": {"batch1": 1000 / ms["batch1"],
                                                           "batch8": 8000 / ms["batch8"]},
                         "ratio_to_in_process": ratio, "transports": row.get("transports"), "runs": row}
        table.append(f"| {name} | {transport} | {ms['batch1']:.1f} | {1000 / ms['batch1']:.1f} | "
                     f"{ratio['batch1']:.2f} | {ms['batch8']:.1f} | {8000 / ms['batch8']:.1f} | {ratio['batch8']:.2f} |")
    for name, row in rows.items():
        if "cpu_ms_per_token_batch1" in row:
            summary[name]["cpu_ms_per_token"] = {b: _cpu_medians(row[f"cpu_ms_per_token_{b}"])
                                                 for b in ("batch1", "batch8")}
    import torch

    machine = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
               "torch": torch.__version__, "load_average_start": load_start,
               "load_average_end": os.getloadavg()[0], "in_process_threads": args.threads,
               "torch_default_threads": torch.get_num_threads(),
               "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_"))}}
    command = "python " + shlex.join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                      else sys.argv[0], *sys.argv[1:]])  # quoted: --env-variant values hold spaces
    result = {"benchmark": "mesh_decode", "model": args.model, "tokens": args.tokens, "repeats": args.repeats,
              "machine": machine, "command": command, "results": summary}
    md = "\n".join([f"# Streamed decode: mesh vs in-process Engine ({args.model}, {args.tokens} tokens, greedy)", "",
                    f"Command: `{command}`  ", f"Machine: {machine['cpu_cores']} cores, {machine['platform']}, torch "
                    f"{machine['torch']}; load average {load_start:.2f} at start, {machine['load_average_end']:.2f} "
                    "at end.", "", *table, "", *_cpu_table(summary), "",
                    "ms/token: median over streams of (last chunk - first chunk) / (tokens - 1), median over "
                    "repeats; in process: median Engine.step decode time. ratio = the in-process engine's best "
                    "ms (fastest thread count, per batch) / this row's ms (>= 0.9 is the issue 9 target). "
                    "Pipelining: the batcher sends step N+1 before step N's result is back "
                    "(services/batcher/lookahead.py); 'no pipelining' sets MOEMESH_BATCHER_PIPELINE=false. "
                    "MOEMESH_EXPERT_SPIN_US=N: each shard polls N us for the next request after a reply before it "
                    "blocks (-1: auto, 2000 us on the shards that leave a core for the router; the plain mesh rows "
                    "run the shipped services/expert/config.py spin_us).", ""])
    return result, md


_GROUPS = (("router", ("router",)), ("expert shards", ("expert-",)), ("batcher", ("batcher",)),
           ("gateway", ("gateway",)), ("tokenizer + metering", ("tokenizer", "metering")))


def _cpu_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per process group (_GROUPS) and in all: the median over repeats of CPU ms per streamed token."""
    out = {}
    for group, prefixes in _GROUPS:
        out[group] = statistics.median(sum(v for k, v in run.items() if k.startswith(prefixes)) for run in runs)
    out["all"] = statistics.median(sum(run.values()) for run in runs)
    return out


def _cpu_table(summary: dict) -> list[str]:
    """CPU ms per streamed token by process (utime + stime over the streams): where the mesh's CPU goes."""
    rows = [(name, r["cpu_ms_per_token"][b], b) for name, r in summary.items() if "cpu_ms_per_token" in r
            for b in ("batch1", "batch8")]
    if not rows:
        return []
    head = " | ".join(g for g, _ in _GROUPS)
    lines = [f"| CPU ms per streamed token | batch | {head} | all |", "|---" * (len(_GROUPS) + 3) + "|"]
    for name, cpu, b in rows:
        cells = " | ".join(f"{cpu[g]:.2f}" for g, _ in _GROUPS)
        lines.append(f"| {name} | {b[5:]} | {cells} | {cpu['all']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-moe")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--transports", default="shm", help="comma-separated expert transports (shm, grpc)")
    parser.add_argument("--pipeline", default="on", help="batcher step pipelining variants: on, off or on,off")
    parser.add_argument("--spin", default="default,0",
                        help="comma-separated shard shm poll windows in us (default, 0, 2000, -1 = auto); values "
                             "other than default add a mesh row each (pipelining on)")
    parser.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="in-process torch thread counts to try (default: 1 and torch's default)")
    parser.add_argument("--env-variant", action="append", default=[], metavar="'K=V [K=V...]'",
                        help="a further mesh row (pipelining on, default spin) with these env settings, e.g. "
                             "'MOEMESH_FRONTEND_NICE=10' or 'OTEL_TRACES_SAMPLER=always_off'; repeatable")
    parser.add_argument("--up-variant", action="append", default=[], metavar="'ARGS'",
                        help="a further mesh row (pipelining on, default spin) started with these `moemesh up` "
                             "arguments, e.g. '--backend onnxruntime --expert-shards 0'; repeatable")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engine-backend", default="torch", choices=("torch", "packed", "onnxruntime"),
                        help="the in-process engine's backend (the baseline of the ratio column)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mesh-decode-cpu")
    args = parser.parse_args()
    if args.threads is None:
        import torch

        args.threads = sorted({1, torch.get_num_threads()})
    load_start = os.getloadavg()[0]
    result, md = report(measure(args), args, load_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
