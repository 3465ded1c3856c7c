"""The soak's slow-reader phase (issue 12): a load tenant at a fixed rate alone, then as long next to --slow-streams
streams of a second tenant that read one chunk a second. Its p50/p99 (end to end and to the first token) with and
without them say whether they starve it; failures are counted per error, on both sides.

The slow readers run in a child process of their own (a thousand streams would otherwise slow the load tenant's
client loop, and its latency figures with it). Run from soak.py:

    .venv/bin/python benchmarks/soak.py --phase slow --slow-streams 1000 --slow-minutes 2
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from slow_readers import batcher_counters, cpu_seconds, gauges, phase_figures  # noqa: E402
from moemesh.bench.stats import percentile  # noqa: E402
from moemesh.sdk.client import build_request  # noqa: E402


def latency(records) -> dict:
    """p50/p99 end to end and to the first chunk (s), requests, failures and the most frequent errors."""
    ok = [r for r in records if r.ok]
    e2e = sorted(r.end - r.start for r in ok)
    ttft = sorted(t for t in (r.ttft() for r in ok) if t is not None)
    pick = lambda xs, q: round(percentile(xs, q), 3) if xs else None  # noqa: E731
    errors = collections.Counter(str(r.error)[:120] for r in records if r.error)
    return {"requests": len(records), "failed": sum(errors.values()), "p50_s": pick(e2e, 50), "p99_s": pick(e2e, 99),
            "ttft_p50_s": pick(ttft, 50), "ttft_p99_s": pick(ttft, 99), "errors": dict(errors.most_common(5))}


async def run_slow_phase(target: str, key: str, slow_key: str, model: str, status_path: Path, rate: float,
                         args, load) -> dict:
    """`load(rate, seconds, seed)` -> (records, duration): the load tenant alone, then next to the slow readers."""
    seconds, streams = args.slow_minutes * 60, args.slow_streams
    snap = lambda: (cpu_seconds(status_path), batcher_counters(status_path))  # noqa: E731
    s0 = snap()
    alone, _ = await load(rate, seconds, 2)
    s1 = snap()
    readers = await asyncio.create_subprocess_exec(
        sys.executable, __file__, target, slow_key, model, str(streams), str(seconds), str(args.slow_tokens),
        str(args.slow_window), stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(min(streams / 100, seconds / 4))  # they open over streams/100 s: measure once they are on
    done = asyncio.Event()
    watch = asyncio.create_task(gauges(status_path, done, every=10.0))
    mixed, _ = await load(rate, seconds, 3)
    out, _ = await readers.communicate()
    done.set()
    s2 = snap()
    slow = json.loads(out.decode().strip().splitlines()[-1])
    return {"streams": streams, "rate_rps": round(rate, 2), "seconds": round(seconds), "max_tokens": args.slow_tokens,
            "window": args.slow_window, "slow": slow, "load_alone": latency(alone), "load_with_slow": latency(mixed),
            "alone": phase_figures(s0, s1, seconds), "with_slow": phase_figures(s1, s2, seconds),
            "batcher_over_time": await watch}


def rows(slow: dict) -> list[str]:
    """The slow phase as a markdown table: the load tenant alone and next to the slow readers."""
    out = ["| load tenant | requests | failed | p50 / p99 end to end (s) | p50 / p99 first token (s) | tokens/s | "
           "mean batch | preemptions | parks | CPU cores per service |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, lat, fig in (("alone", slow["load_alone"], slow["alone"]),
                            (f"next to {slow['streams']} slow streams", slow["load_with_slow"], slow["with_slow"])):
        cpu = ", ".join(f"{k} {v}" for k, v in sorted(fig["cpu_cores"].items()))
        out.append(f"| {label} | {lat['requests']} | {lat['failed']} | {lat['p50_s']} / {lat['p99_s']} | "
                   f"{lat['ttft_p50_s']} / {lat['ttft_p99_s']} | {fig['tokens_per_s']} | {fig['mean_batch']} | "
                   f"{fig['preemptions']} | {fig['parks']} | {cpu} |")
    return out


NOTES = """The load tenant's p50/p99 end to end (32 tokens), alone and next to the slow streams; each run below in full.
What a failure means: `CANCELLED: CANCELLED` with no chunk is gRPC in the gateway cancelling a call that its code had
not taken in within 30 s (`grpc.server_max_unrequested_time_in_server`): the gateway, then at nice 10, got almost no
CPU once the engine ran full batches. `DEADLINE_EXCEEDED` would be a slow stream still in the batcher's queue when
its client's deadline (phase + 120 s) passed."""


def overview(runs: list[dict]) -> list[str]:
    """One row per run: the load tenant alone / next to the slow streams, failures on both sides."""
    out = ["| run | load average | slow streams | load tenant p50 alone / with (s) | p99 alone / with (s) | "
           "load tenant failed alone / with | slow streams failed | mean batch with |",
           "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run["slow"]
        a, w = s["load_alone"], s["load_with_slow"]
        out.append(f"| {run['label']} | {run['machine']['loadavg'][0]} | {s['streams']} | "
                   f"{a['p50_s']} / {w['p50_s']} | {a['p99_s']} / {w['p99_s']} | {a['failed']} / {w['failed']} | "
                   f"{s['slow']['opened'] - s['slow']['ok']} | {s['with_slow']['mean_batch']} |")
    return out


def summary(slow: dict) -> str:
    s = slow["slow"]
    errors = "; ".join(f"{n} x `{e}`" for e, n in s["errors"].items()) or "none"
    load_errors = "; ".join(f"{n} x `{e}`" for e, n in slow["load_with_slow"]["errors"].items()) or "none"
    return (f"{slow['streams']} slow streams (tenant `slow`, max_tokens {slow['max_tokens']}, one chunk a second, "
            f"HTTP/2 stream window {slow['window'] or 'grpc default (BDP)'} B) held {slow['seconds']} s: "
            f"{s['opened']} opened, {s['ok']} read to the end of the phase, failed: {errors}; {s['chunks']} chunks "
            f"read. Load tenant at {slow['rate_rps']} req/s: failures next to them: {load_errors}.")


async def _readers(target: str, key: str, model: str, streams: int, seconds: float, tokens: int, window: int) -> dict:
    """`streams` streams reading one chunk a second for `seconds` (then cancelling). Each error is kept with when it
    came (seconds after the call started) and how many chunks its stream had read: who ended it shows in both."""
    import grpc

    from moemesh.v1 import chat_pb2_grpc

    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)] if window else []
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, streams // 100))]
    metadata, read, failures = (("authorization", f"Bearer {key}"),), [0], []

    async def one(i: int) -> None:
        await asyncio.sleep(i * 0.01)  # open them over streams/100 s, not in one burst
        request = build_request("slow reader " * 4, model=model, max_tokens=tokens, ignore_eos=True)
        call = chat_pb2_grpc.ChatStub(channels[i % len(channels)]).StreamChatCompletion(
            request, metadata=metadata, timeout=seconds + 120)
        start, mine = time.monotonic(), 0  # failures keep (error, seconds after start, chunks read)
        try:
            async for chunk in call:
                read[0], mine = read[0] + 1, mine + 1
                if chunk.HasField("error"):
                    _failed(failures, f"in-band {chunk.error.code}: {chunk.error.message[:80]}", start, mine)
                    return
                if time.monotonic() > start + seconds:
                    return
                await asyncio.sleep(1.0)  # a client reading slowly: HTTP/2 flow control pushes back
        except grpc.aio.AioRpcError as exc:
            _failed(failures, f"{exc.code().name}: {(exc.details() or '')[:80]}", start, mine)
        finally:
            call.cancel()

    await asyncio.gather(*(one(i) for i in range(streams)))
    for channel in channels:
        await channel.close()
    counts = collections.Counter(e for e, _, _ in failures)
    return {"opened": streams, "ok": streams - len(failures), "chunks": read[0], "errors": dict(counts.most_common(5)),
            "failures": [{"error": e, "at_s": round(t, 1), "chunks": n} for e, t, n in failures[:50]]}


def _failed(failures: list, error: str, start: float, chunks: int) -> None:
    failures.append((error, time.monotonic() - start, chunks))


if __name__ == "__main__":  # the slow readers' own process: prints one JSON line
    t, k, m, n, s, tok, w = sys.argv[1:8]
    started = time.monotonic()
    result = asyncio.run(_readers(t, k, m, int(n), float(s), int(tok), int(w)))
    print(json.dumps({**result, "wall_s": round(time.monotonic() - started, 1)}), flush=True)
