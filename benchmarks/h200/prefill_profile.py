"""Where one long prefill's GPU time goes: Engine.step on a single new sequence of --prompt tokens (Qwen3-30B-A3B
shape, random weights, 48 layers), once untimed (compilation), then once under torch.profiler; prints the kernels by
total GPU time (count, ms, share) and the step's wall time, and writes them as JSON.

    source benchmarks/h200/setup.sh && python3 benchmarks/h200/prefill_profile.py --quantization fp8 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_gpu import MODELS  # noqa: E402

from moemesh.runtime.engine import Engine  # noqa: E402
from moemesh.runtime.types import SequenceWork  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantization", default="none")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "config.json").write_text(json.dumps(MODELS["qwen3"][1]))
        engine = Engine.load(model_dir, load_format="dummy", device="cuda", dtype=torch.bfloat16,
                             kv_memory_bytes=8 * 2**30, max_context=args.prompt + 64,
                             quantization=args.quantization)
    gen = torch.Generator().manual_seed(0)

    def prefill(name: str) -> float:
        ids = torch.randint(0, engine.spec.vocab_size, (args.prompt,), generator=gen).tolist()
        started = time.perf_counter()
        engine.step([SequenceWork(name, ids, 0)])
        wall = time.perf_counter() - started
        engine.release([name])
        return wall * 1e3

    prefill("warm")
    activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        wall = prefill("profiled")
    kernels = {}
    host = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CPU and ev.name.startswith("cuda"):  # runtime calls: syncs
            h = host.setdefault(ev.name, [0, 0.0])
            h[0] += 1
            h[1] += ev.cpu_time_total / 1e3
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(ev.name[:90], [0, 0.0])
            k[0] += 1
            k[1] += ev.device_time_total / 1e3
    total = sum(ms for _, ms in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]
    print(f"prefill of {args.prompt} tokens ({args.quantization}): wall {wall:.2f} ms, kernels {total:.2f} ms")
    for name, (count, ms) in top:
        print(f"{ms:8.2f} ms {100 * ms / total:5.1f}% x{count:<5d} {name}")
    print("CUDA runtime calls on the host (count, ms): " + ", ".join(
        f"{n} x{c} {ms:.2f}" for n, (c, ms) in sorted(host.items(), key=lambda kv: -kv[1][1])[:8]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill-profile-h200-{args.quantization}-{args.prompt}.json").write_text(json.dumps(
        {"machine": torch.cuda.get_device_name(), "command": "python3 " + " ".join(sys.argv), "wall_ms": wall,
         "host_cuda_calls": {n: {"count": c, "ms": round(m, 3)} for n, (c, m) in host.items()},
         "kernel_ms": total, "top": [{"kernel": n, "count": c, "ms": round(m, 3)} for n, (c, m) in top]},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
