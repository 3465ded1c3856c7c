"""Issue 15: DP2 (two independent meshes) against M:N (two routers sharing the expert shards), with `moemesh bench`.

    DP2  two `moemesh up` meshes, each one router + batcher (cuda: one GPU each, experts co-located in the router;
         cpu: one expert shard process each); the load is split between their gateways (ceil/floor of c/2)
    M:N  one `moemesh up --routers 2`: two router + batcher replicas sharing the shards (cuda: one shard per GPU,
         transport auto: cuda_ipc on the router's own GPU, NCCL to the other; cpu: 2 shards over shared memory);
         the gateway spreads the load over both batchers

Per concurrency: output tok/s (total, per GPU = total / 2; on the CPU "per replica"), TTFT and ITL p50/p99 (DP2:
p50 = the two runs' completed-weighted mean, p99 = the worse), and per MoE layer the router's expert call time
(router_expert_call_seconds: dispatch + shard compute + combine, as the router waits for it) minus the shards'
compute (moemesh_expert_forward_compute_seconds) = dispatch + combine (transport and, for M:N, waiting for the
other router's layer). Last, on the M:N mesh: SIGKILL of expert-0 under load: time until a client sees an error,
time until requests succeed again (the supervisor restarts the shard, the routers re-attach), whether any request
hung (ran past --hang-s).

    PYTHONPATH=. python3 benchmarks/multi_gpu.py --device cpu --small     # here: results/multi-gpu-cpu.{md,json}
    PYTHONPATH=. python3 benchmarks/multi_gpu.py --device cuda            # 2 GPUs: results/multi-gpu-cuda.{md,json}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu_parts import Mesh, bench, kill_under_load, layer_times, model_dir  # noqa: E402


def settings(args) -> dict:
    """What each variant runs; --small is the reduced CPU version."""
    if args.device == "cuda":
        extra = ["--device", "cuda", "--dtype", "bfloat16", "--load-format", "dummy"]
        extra += ["--quantization", args.quantization] if args.quantization != "none" else []
        return {"dp2": {"up": [*extra, "--expert-shards", "0"], "gpus": [["0"], ["1"]]},
                "mn": {"up": [*extra, "--routers", "2", "--expert-shards", "2"], "gpus": ["0,1"]},
                "concurrency": [1, 64, 256], "prompt": 128, "max_tokens": 128, "requests": 2}
    small = args.small
    return {"dp2": {"up": ["--expert-shards", "1", "--expert-transport", "shm"], "gpus": [None, None]},
            "mn": {"up": ["--routers", "2", "--expert-shards", "2", "--expert-transport", "shm"], "gpus": [None]},
            "concurrency": [1, 4, 8] if small else [1, 16, 32], "prompt": 32 if small else 128,
            "max_tokens": 16 if small else 64, "requests": 2}


def split(total: int, parts: int) -> list[int]:
    """[ceil, floor] shares of `total` over `parts` meshes, zeros dropped."""
    return [n for n in (math.ceil(total / parts), total // parts) if n][:parts]


def combine(docs: list[dict]) -> dict:
    """DP2: the runs of both meshes as one figure (tok/s summed, p50 weighted by completed, p99 the worse)."""
    done = sum(d["completed"] for d in docs) or 1
    out = {"output_tokens_per_s": round(sum(d["output_tokens_per_s"] for d in docs), 2),
           "completed": sum(d["completed"] for d in docs), "failed": sum(d["failed"] for d in docs)}
    for key in ("ttft_ms", "itl_ms"):
        out[key] = {"p50": round(sum(d[key]["p50"] * d["completed"] for d in docs) / done, 2),
                    "p99": round(max(d[key]["p99"] for d in docs), 2)}
    return out


def run_variant(name: str, spec: dict, s: dict, args, model: str, logs: Path) -> list[dict]:
    meshes = [Mesh(f"{name}-{i}", model, spec["up"], gpus, logs) for i, gpus in enumerate(spec["gpus"])]
    rows = []
    try:
        for mesh in meshes:
            mesh.start(args.start_timeout)
        for c in s["concurrency"]:
            shares = split(c, len(meshes))
            before = [m.scrape() for m in meshes]
            docs = bench([(m, n, max(s["requests"] * n, 2)) for m, n in zip(meshes, shares)], s["prompt"],
                         s["max_tokens"], logs / f"bench-{name}-{c}")
            layer = layer_times(before, [m.scrape() for m in meshes])
            figures = combine(docs)
            rows.append({"variant": name, "concurrency": c, **figures,
                         "tok_s_per_gpu": round(figures["output_tokens_per_s"] / 2, 2), **layer})
            print(json.dumps(rows[-1]), flush=True)
        if name == "mn" and not args.no_kill:
            rows.append({"variant": name, "fault": kill_under_load(meshes[0], "expert-0", args.kill_clients,
                                                                   s["max_tokens"], args.hang_s)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for mesh in meshes:
            mesh.stop()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--small", action="store_true", help="reduced CPU run: concurrency 1/4/8, short requests")
    p.add_argument("--model", default=None, help="default: smollm2-moe on cpu, Qwen3-30B-A3B shape (dummy) on cuda")
    p.add_argument("--layers", type=int, default=48, help="cuda: layers of the Qwen3-30B-A3B shape")
    p.add_argument("--quantization", default="none", choices=("none", "fp8"), help="cuda: fp8 experts")
    p.add_argument("--variants", default="dp2,mn")
    p.add_argument("--kill-clients", type=int, default=4, help="clients in flight while expert-0 is killed")
    p.add_argument("--hang-s", type=float, default=60.0, help="a request running longer than this counts as hung")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    s = settings(args)
    model = args.model or model_dir(args.device, args.layers, logs)
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for name in args.variants.split(","):
        try:
            rows += run_variant(name, s[name], s, args, model, logs)
        except Exception as exc:  # noqa: BLE001 -- recorded; the other variant still runs
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": machine(args.device), "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()], "model": model, "settings": s, "logs": str(logs),
            "command": "PYTHONPATH=. python3 benchmarks/multi_gpu.py " + " ".join(argv or sys.argv[1:])}
    write(args, meta, rows)
    return 0


def machine(device: str) -> dict:
    out = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if device == "cuda":
        import torch

        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def write(args, meta: dict, rows: list[dict]) -> None:
    stem = "multi-gpu-cpu" if args.device == "cpu" else "multi-gpu-cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    unit = "per GPU" if args.device == "cuda" else "per replica"
    lines = [f"# DP2 vs M:N ({args.device}{', --small' if args.small else ''})", "",
             f"`{meta['command']}`; {meta['machine']}; load average before {meta['load_before']}, after "
             f"{meta['load_after']}; model {meta['model']}", "",
             f"| variant | conc. | tok/s | tok/s {unit} | TTFT p50 / p99 ms | ITL p50 / p99 ms | done / failed | "
             "expert call per layer us | shard compute us | dispatch+combine us | merged |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "concurrency" in r:
            lines.append(f"| {r['variant']} | {r['concurrency']} | {r['output_tokens_per_s']} | {r['tok_s_per_gpu']} | "
                         f"{r['ttft_ms']['p50']} / {r['ttft_ms']['p99']} | {r['itl_ms']['p50']} / {r['itl_ms']['p99']} "
                         f"| {r['completed']} / {r['failed']} | {r.get('call_us', '-')} | {r.get('compute_us', '-')} "
                         f"| {r.get('dispatch_combine_us', '-')} | {r.get('merged_share', '-')} |")
    for r in rows:
        if "fault" in r or "error" in r:
            lines += ["", f"- {r['variant']}: {json.dumps(r.get('fault') or r.get('error'))}"]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
