"""mesh_profile.py --cprofile DIR: cProfile in the front end's services over the decode-only window, through
benchmarks/cprofile_hook/sitecustomize.py (loaded by the services only when this sets PYTHONPATH to its folder)."""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The front end: what --cprofile profiles (benchmarks/cprofile_hook/sitecustomize.py, by OTEL_SERVICE_NAME).
PROFILED = ("batcher", "gateway", "tokenizer", "metering")


def collect_profiles(folder: Path, profiled: dict[str, int], concurrency: int, tokens: int, top: int = 25) -> dict:
    """Waits for each profiled service's DIR/<name>.prof, renames it <name>-c<concurrency>.prof and returns its top
    functions by own time: {name: [(function, calls per token, own us per token, cumulative us per token)]}."""
    import pstats

    out = {}
    for name in profiled:
        path, give_up = folder / f"{name}.prof", time.monotonic() + 10
        while not path.exists() and time.monotonic() < give_up:
            time.sleep(0.2)
        if not path.exists():
            continue
        time.sleep(0.3)  # the dump may still be being written
        kept = path.rename(folder / f"{name}-c{concurrency}.prof")
        if (folder / f"{name}.gc.json").exists():  # garbage collections per generation in the window
            (folder / f"{name}.gc.json").rename(folder / f"{name}-c{concurrency}.gc.json")
        stats = pstats.Stats(str(kept)).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
        rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
        out[name] = [(f"{Path(f).name}:{line}({func})", nc / tokens, tt * 1e6 / tokens, ct * 1e6 / tokens)
                     for (f, line, func), (_, nc, tt, ct, _) in rows]
    return out


def cprofile_env(folder: Path | None) -> dict[str, str]:
    """The env that makes the front end's services load the hook (none without --cprofile)."""
    if folder is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    hook = str(ROOT / "benchmarks" / "cprofile_hook")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [hook, os.environ.get("PYTHONPATH")])),
            "MOEMESH_CPROFILE_DIR": str(folder.resolve()), "MOEMESH_CPROFILE_SERVICES": ",".join(PROFILED)}


def profile_lines(rows: list[dict], top: int = 12) -> list[str]:
    """--cprofile: each front-end service's top functions by own time, per decoded token."""
    out = []
    for r in rows:
        for name, funcs in (r.get("cprofile_top") or {}).items():
            out += ["", f"cProfile, {name}, concurrency {r['concurrency']} (per decoded token; cProfile slows "
                    "Python calls, so compare these between runs, not with the CPU tables):", "",
                    "| function | calls | own us | cumulative us |", "|---|---|---|---|"]
            out += [f"| `{f}` | {n:.1f} | {tt:.0f} | {ct:.0f} |" for f, n, tt, ct in funcs[:top]]
    return out
