"""The benchmark's JSON document (figures + what ran: machine, command, load) and its table."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from moemesh.bench.workload import LoadSpec

FIGURES = ("ttft_ms", "itl_ms", "e2e_ms")
STATS = ("mean", "p50", "p95", "p99")


def machine(device: str | None = None) -> dict:
    """Where it ran; the load average matters on shared cores."""
    out = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
           "processor": platform.processor(), "hostname": platform.node(),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "git_commit": _git_commit()}
    if device is not None:
        out["device"] = device
    return out


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def document(summary: dict, spec: LoadSpec, *, mode: str, target: str, model: str | None, argv: list[str],
             device: str | None = None) -> dict:
    return {**summary, "mode": mode, "target": target, "model": model, "load": asdict(spec),
            "machine": machine(device), "command": shlex.join(["moemesh", "bench", *argv]),
            "finished_unix": round(time.time(), 3)}


def table(doc: dict) -> str:
    """A human-readable summary: the load, throughput, then one row per latency figure."""
    load = doc["load"]
    arrivals = f"Poisson {load['rate']}/s" if load["rate"] else "closed loop"
    lines = [
        f"moemesh bench: {doc['mode']} {doc['target']} (model {doc['model']})",
        f"  concurrency {load['concurrency']}, {arrivals}, prompt ~{load['prompt_tokens']} words, "
        f"max_tokens {load['max_tokens']}{', ignore_eos' if load['ignore_eos'] else ''}",
        f"  completed {doc['completed']}, failed {doc['failed']} in {doc['duration_s']:.2f} s "
        f"({doc['requests_per_s']:.2f} req/s)",
        f"  output tokens {doc['output_tokens']} ({doc['output_tokens_per_s']:.1f} tok/s); mean prompt "
        f"{doc['prompt_tokens_mean']} tokens, mean output {doc['output_tokens_mean']} tokens",
        "",
        f"  {'':8}" + "".join(f"{k:>10}" for k in STATS),
    ]
    for name in FIGURES:
        row = doc[name]
        cells = "".join(f"{'-' if row[k] is None else format(row[k], '.1f'):>10}" for k in STATS)
        lines.append(f"  {name:8}{cells}")
    for error, count in doc.get("errors", {}).items():
        lines.append(f"  error x{count}: {error}")
    return "\n".join(lines)
