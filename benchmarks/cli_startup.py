"""Start-up time of the `moemesh` command line: wall time of `moemesh <command> --help` (a fresh interpreter each
run, as a person typing it gets), median and max over --repeat runs, and which heavy modules the command imported.

A client command (chat, usage, tenants, trace, bench, top) must answer --help in under 0.5 s and import no torch; `convert`
and `eval` do need torch and are listed for comparison.

    .venv/bin/python benchmarks/cli_startup.py [--repeat 7]
Writes benchmarks/results/cli-startup.json (machine, command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_COMMANDS = ["chat", "usage", "tenants", "trace", "bench", "top"]
OTHER_COMMANDS = ["up", "certs", "convert", "eval", "quantize"]
HEAVY = ["torch", "numpy", "transformers", "safetensors", "redis", "grpc", "opentelemetry"]
BUDGET_S = 0.5
# Runs main() as the console script does, then reports which heavy modules ended up imported.
PROBE = ("import sys; from moemesh.cli.main import main\n"
         "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         f"print('\\nHEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")


def time_help(command: list[str], repeat: int) -> dict:
    """Wall seconds of the real console script, and the heavy modules its code path imports."""
    script = ROOT / ".venv" / "bin" / "moemesh"
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "moemesh.cli.main"]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run([*exe, *command, "--help"], capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    probe = subprocess.run([sys.executable, "-c", PROBE, *command, "--help"], capture_output=True, text=True,
                           cwd=ROOT)
    heavy = probe.stderr.rsplit("HEAVY", 1)[-1].strip()
    return {"command": " ".join(["moemesh", *command, "--help"]), "exit_code": done.returncode,
            "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
            "heavy_imports": heavy.split(",") if heavy else []}


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor(), "loadavg": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli-startup.json")
    args = parser.parse_args()
    rows = [time_help([], args.repeat)]
    rows += [{**time_help([c], args.repeat), "client": c in CLIENT_COMMANDS} for c in CLIENT_COMMANDS + OTHER_COMMANDS]
    print(f"{'command':<28} {'exit':>4} {'median s':>9} {'max s':>7}  heavy imports")
    for r in rows:
        print(f"{r['command']:<28} {r['exit_code']:>4} {r['median_s']:>9.3f} {r['max_s']:>7.3f}  "
              f"{','.join(r['heavy_imports']) or '-'}")
    clients = [r for r in rows if r.get("client") and r["exit_code"] == 0]
    ok = all(r["median_s"] < BUDGET_S and "torch" not in r["heavy_imports"] for r in clients)
    print(f"client commands under {BUDGET_S} s without torch: {'yes' if ok else 'NO'}")
    doc = {"benchmark": "cli_startup", "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "machine": machine(), "repeat": args.repeat, "budget_s": BUDGET_S, "clients_within_budget": ok,
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
