"""Where slow HTTP/gRPC readers cost the other tenants: the load tenant's latency alone, then next to --streams slow
readers of a second tenant (each reads one chunk a second), with per-service CPU seconds, the tokens the batcher
generated, the chunks the slow readers actually read, and the batcher's queue/batch/preemption figures per phase.

    .venv/bin/python benchmarks/slow_readers.py --streams 200 --seconds 40 --rate 4
Writes benchmarks/results/slow-readers[-TAG].json (machine, command) and a table of every slow-readers-*.json in
benchmarks/results/slow-readers-probes.md (slow-readers.md is soak.py --phase slow's). soak.py reuses `cpu_seconds`,
`phase_figures` and `gauges`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from moemesh.bench.report import machine  # noqa: E402
from moemesh.bench.stats import percentile  # noqa: E402
from moemesh.sdk.client import build_request  # noqa: E402
from moemesh.v1 import chat_pb2_grpc  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TICKS = os.sysconf("SC_CLK_TCK")


async def slow_readers(target: str, key: str, model: str, count: int, hold_s: float, held: list[int],
                       max_tokens: int = 200, read: list[int] | None = None, window: int = 0) -> list[str]:
    """`count` streams of the slow tenant, each reading one chunk per second for hold_s (then cancelling); returns
    their errors. held[0]: streams open now; read[0]: chunks read so far. window: the clients' HTTP/2 stream window
    in bytes (BDP probing off); 0: grpc's default (64 KiB growing by BDP probing to MiBs, which then holds a whole
    answer: the server cannot tell such a reader from a fast one)."""
    import grpc

    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)] if window else []
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, count // 100))]
    metadata = (("authorization", f"Bearer {key}"),)
    read = read if read is not None else [0]

    async def one(i: int) -> str:
        stub = chat_pb2_grpc.ChatStub(channels[i % len(channels)])
        request = build_request("slow reader " * 4, model=model, max_tokens=max_tokens, ignore_eos=True)
        await asyncio.sleep(i * 0.01)  # open them over count/100 s, not in one burst
        call = stub.StreamChatCompletion(request, metadata=metadata, timeout=hold_s + 120)
        held[0] += 1
        try:
            end = time.monotonic() + hold_s
            async for _ in call:
                read[0] += 1
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


def cpu_seconds(status_path: Path) -> dict[str, float]:
    """service -> user + system CPU seconds of its main process so far."""
    out = {}
    for name, svc in json.loads(status_path.read_text())["services"].items():
        try:
            fields = Path(f"/proc/{svc['pid']}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError):
            pass
    return out


def batcher_counters(status_path: Path) -> dict[str, float]:
    """The batcher's generated tokens, preemptions and steps so far (its Prometheus endpoint)."""
    svc = json.loads(status_path.read_text())["services"]["batcher"]
    host = svc["address"].rsplit(":", 1)[0]
    text = urllib.request.urlopen(f"http://{host}:{svc['metrics_port']}/metrics", timeout=10).read().decode()
    out = {}
    for name, key in (("generation_tokens_total", "tokens"), ("num_preemptions_total", "preemptions"),
                      ("batch_size_count", "steps"), ("batch_size_sum", "batch_sum"),
                      ("stream_parks_total", "parks"), ("kv_cache_usage_perc", "kv_usage"),
                      ("num_requests_waiting", "waiting"), ("num_requests_running", "running")):
        m = re.search(rf"^moemesh_batcher_{name} ([0-9.e+]+)$", text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


async def gauges(status_path: Path, done: asyncio.Event, every: float = 5.0) -> list[dict]:
    """The batcher's KV usage, waiting and running requests every `every` seconds until `done`."""
    out, t0 = [], time.monotonic()
    while not done.is_set():
        with contextlib.suppress(OSError, ValueError):
            b = await asyncio.to_thread(batcher_counters, status_path)
            out.append({"t": round(time.monotonic() - t0), "kv_usage": round(b["kv_usage"], 3),
                        "waiting": int(b["waiting"]), "running": int(b["running"])})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)
    return out


def phase_figures(before: tuple, after: tuple, seconds: float) -> dict:
    """CPU share per service and batcher figures between two (cpu_seconds, batcher_counters) snapshots."""
    (cpu0, b0), (cpu1, b1) = before, after
    steps = b1["steps"] - b0["steps"]
    return {"cpu_cores": {k: round((cpu1[k] - cpu0[k]) / seconds, 2) for k in cpu1 if k in cpu0},
            "tokens_per_s": round((b1["tokens"] - b0["tokens"]) / seconds, 1),
            "preemptions": int(b1["preemptions"] - b0["preemptions"]), "steps": int(steps),
            "parks": int(b1["parks"] - b0["parks"]),
            "mean_batch": round((b1["batch_sum"] - b0["batch_sum"]) / steps, 1) if steps else 0.0}


def p99(records) -> float | None:
    e2e = sorted(r.end - r.start for r in records if r.ok)
    return round(percentile(e2e, 99), 3) if e2e else None


async def probe(args: argparse.Namespace) -> dict:
    from chaos import start_mesh, tiny_model
    from soak import _load, _tenant

    home = Path(tempfile.mkdtemp(prefix="moemesh-slow-"))
    proc, status_path = start_mesh(home, tiny_model())
    try:
        status = json.loads(status_path.read_text())
        target, key, model = status["gateway"], status["api_key"], status["model"]
        slow_key = _tenant(home, "slow")
        await _load(target, key, model, args.rate, 10, seed=9)  # warm-up
        snap = lambda: (cpu_seconds(status_path), batcher_counters(status_path))  # noqa: E731
        s0 = snap()
        alone, _ = await _load(target, key, model, args.rate, args.seconds, seed=2)
        s1 = snap()
        held, read = [0], [0]
        mixed = asyncio.create_task(_load(target, key, model, args.rate, args.seconds, seed=3))
        done = asyncio.Event()
        watch = asyncio.create_task(gauges(status_path, done))
        errors = await slow_readers(target, slow_key, model, args.streams, args.seconds, held, args.max_tokens, read,
                                    args.window)
        records, _ = await mixed
        done.set()
        s2 = snap()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"streams": args.streams, "seconds": args.seconds, "rate_rps": args.rate, "max_tokens": args.max_tokens,
            "window": args.window,
            "alone": {"p99_s": p99(alone), "failed": sum(not r.ok for r in alone), **phase_figures(s0, s1, args.seconds)},
            "with_slow": {"p99_s": p99(records), "failed": sum(not r.ok for r in records), "slow_errors": len(errors),
                          "load_error_samples": sorted({str(r.error)[:120] for r in records if r.error})[:5],
                          "slow_error_samples": sorted(set(errors))[:5],
                          "slow_chunks_read": read[0], **phase_figures(s1, s2, args.seconds),
                          "batcher_over_time": await watch}}


def table() -> str:
    """One row per slow-readers-*.json result: the load tenant alone, then next to the slow readers."""
    rows = ["| run | load avg | slow streams x max_tokens, window | load tenant p99 alone / with (s) | tokens/s alone / "
            "with | mean batch alone / with | parks | chunks read | CPU cores gateway, router, tokenizer (with) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("slow-readers-*.json")):
        d = json.loads(path.read_text())
        a, w = d["alone"], d["with_slow"]
        cpu = ", ".join(str(w["cpu_cores"].get(k)) for k in ("gateway", "router", "tokenizer"))
        rows.append(f"| `{path.stem}`: `{d['command'].split('slow_readers.py ')[-1]}` | {d['machine']['loadavg'][0]} | "
                    f"{d['streams']} x {d['max_tokens']}, {d.get('window') or 'grpc default (BDP)'} | {a['p99_s']} / "
                    f"{w['p99_s']} | {a['tokens_per_s']} / {w['tokens_per_s']} | {a['mean_batch']} / "
                    f"{w['mean_batch']} | {w.get('parks', '-')} | {w['slow_chunks_read']} | {cpu} |")
    return "\n".join(["# Slow readers next to a tenant under load", "", "Each row: `benchmarks/slow_readers.py` "
                      "(tiny MoE, `moemesh up`, 2 shared CPUs); the load tenant at --rate req/s alone for --seconds, "
                      "then as long next to the slow readers (1 chunk/s each).", "", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--rate", type=float, default=4.0, help="the load tenant's requests per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=200, help="max_tokens of each slow stream")
    p.add_argument("--window", type=int, default=65535, help="slow clients' HTTP/2 stream window (0: grpc's BDP)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args(argv)
    doc = asyncio.run(probe(args))
    doc.update(machine=machine(), command=" ".join([".venv/bin/python", "benchmarks/slow_readers.py", *argv]),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    RESULTS.mkdir(exist_ok=True)
    name = f"slow-readers{'-' + args.tag if args.tag else ''}"
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = table()
    (RESULTS / "slow-readers-probes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
