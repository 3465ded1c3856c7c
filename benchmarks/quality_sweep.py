"""Quality/sparsity sweep of dense -> MoE conversion, before and after distillation (meant for a GPU).

    python benchmarks/quality_sweep.py --device cuda --eval-ids IDS.pt --out sweep.json [--time-budget S]
    python benchmarks/quality_sweep.py --tiny --device cpu --out /tmp/s.json      # smoke test, tiny random model

Calibration (self-generated text, activations recorded on the way) and the distillation pool (self-generated) are
made once; every configuration partitions/routes from them, is scored on the eval windows, distilled (routers +
experts) and scored again. The expert learning rate is picked once by held-out KL on self-generated text (never on
the eval text); distillation steps are sized from the measured step time to fit --time-budget. Results are rewritten
to --out after every configuration, so a run cut short still reports what finished.
Eval: perplexity with the conversion model in float32 over consecutive windows (as `moemesh eval perplexity`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemesh.convert.calibration import build_student, calibrate  # noqa: E402
from moemesh.convert.checkpoint import read_dense, build_dense  # noqa: E402
from moemesh.convert.distill import distill  # noqa: E402
from moemesh.convert.selfgen import self_generated  # noqa: E402
from moemesh.convert.settings import ConvertSettings  # noqa: E402
from moemesh.evaluation.perplexity import split_windows  # noqa: E402

# (label, experts, top_k, shared_neurons, weight of its share of the distillation time). "of 8": with a shared
# expert, 1 shared + (k-1) of 7 routed experts, so the active FFN share is k/8 with or without it.
CONFIGS = [("k6", 8, 6, 0, 2.5), ("k6+shared", 7, 5, 192, 2.5), ("k4", 8, 4, 0, 1.0), ("k4+shared", 7, 3, 192, 1.0),
           ("k2", 8, 2, 0, 0.5), ("k2+shared", 7, 1, 192, 0.5)]
TINY_CONFIGS = [("k2", 4, 2, 0, 1.0), ("k2+shared", 3, 1, 32, 1.0)]


def log(msg: str) -> None:
    print(f"[sweep {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean NLL) over windows [N, W] (each predicts W - 1 tokens), float32 matmuls."""
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(chunk).float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def eval_windows(ids: torch.Tensor, window: int, counts: list[int], device: str) -> dict[int, torch.Tensor]:
    whole = [w for w in split_windows(ids.tolist(), window) if len(w) == window]
    return {n: torch.tensor(whole[:n], device=device) for n in counts if len(whole) >= n}


def score(model: torch.nn.Module, windows: dict[int, torch.Tensor]) -> dict[str, float]:
    return {f"ppl_{n}x{w.shape[1]}": round(perplexity(model, w), 4) for n, w in windows.items()}


def pick_lr(teacher, student, data, settings: ConvertSettings, lrs: list[float],
            probe_steps: int) -> tuple[float, float, list]:
    """Expert learning rate with the lowest held-out KL after probe_steps steps; also seconds per step."""
    trials = []
    for lr in lrs:
        trial = copy.deepcopy(student)
        report = distill(teacher, trial, data, replace(settings, distill_steps=probe_steps, lr_experts=lr))
        trials.append({"lr_experts": lr, "heldout_kl": round(report.heldout_kl_after, 5),
                       "seconds_per_step": report.seconds / report.steps})
        log(f"probe lr_experts {lr:g}: held-out KL {report.heldout_kl_before:.4f} -> {report.heldout_kl_after:.4f}")
        del trial
    best = min(trials, key=lambda t: t["heldout_kl"])
    return best["lr_experts"], min(t["seconds_per_step"] for t in trials), trials


def run_config(label, experts, top_k, shared, base: ConvertSettings, steps: int, ctx: dict) -> dict:
    settings = replace(base, experts=experts, top_k=top_k, shared_neurons=shared, distill_steps=steps)
    dense, device = ctx["dense"], ctx["device"]
    student, hits = build_student(dense, ctx["calib"], settings, log, device, ctx["memo"])
    student = student.to(device)
    row = {"label": label, "experts": experts, "top_k": top_k, "shared_neurons": shared,
           "active_ffn_fraction": settings.active_ffn_fraction(dense.shape.intermediate_size),
           "router_hit_rate_mean": round(sum(hits) / len(hits), 4), "before": score(student, ctx["windows"])}
    log(f"{label}: before distillation {row['before']}")
    if steps:
        report = distill(ctx["teacher"], student, ctx["data"], settings, log)
        row["after"] = score(student, ctx["windows"])
        row["distill"] = {**report.to_json(), "lr_experts": settings.lr_experts, "lr_router": settings.lr_router}
        log(f"{label}: after {report.steps} steps ({report.seconds:.0f}s) {row['after']}")
    del student
    return row


def tiny_dense(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                                 tie_word_embeddings=True)).save_pretrained(out)
    return out


def setup(ns: argparse.Namespace) -> tuple[dict, ConvertSettings, dict]:
    if ns.tiny:
        dense_dir = tiny_dense(Path(tempfile.mkdtemp()) / "tiny_dense")
        ids = torch.randint(0, 512, (4096,), generator=torch.Generator().manual_seed(0))
    else:
        from moemesh.models.registry import resolve_model

        dense_dir = Path(ns.dense) if ns.dense else resolve_model("smollm2")
        ids = torch.load(ns.eval_ids).long()
    base = ConvertSettings(calib_tokens=ns.calib_tokens, seq_len=ns.seq_len, distill_batch=ns.batch,
                           distill_tokens=ns.distill_tokens, lr_router=ns.lr_router, train_experts=True, seed=ns.seed)
    torch.manual_seed(ns.seed)
    dense = read_dense(dense_dir)
    teacher = build_dense(dense).to(ns.device)
    windows = eval_windows(ids, ns.window, ns.windows, ns.device)
    meta = {"device": torch.cuda.get_device_name() if ns.device.startswith("cuda") else platform.machine(),
            "torch": torch.__version__, "command": " ".join(sys.argv), "dense_dir": str(dense_dir),
            "eval_ids_tokens": int(ids.numel()), "settings": base.to_json(), "dense": score(teacher, windows)}
    log(f"dense {meta['dense']}")
    calib = calibrate(teacher, dense, base, log)
    data = self_generated(teacher, dense.path, math.ceil(ns.distill_tokens / ns.seq_len), ns.seq_len, ns.seed + 1, log,
                          batch=ns.gen_batch)
    ctx = {"dense": dense, "teacher": teacher, "calib": calib, "data": data, "windows": windows, "device": ns.device,
           "memo": {}}
    return ctx, base, meta


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense", help="dense HF Llama dir (default: the built-in smollm2)")
    p.add_argument("--eval-ids", help="torch.save'd 1-D tensor of eval token ids (the tokenized eval text)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="smoke test on a tiny random model")
    p.add_argument("--only", nargs="+", help="run only these configuration labels (e.g. k6+shared)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--windows", type=int, nargs="+", default=[8, 32])
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--distill-tokens", type=int, default=1048576)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per distillation step")
    p.add_argument("--gen-batch", type=int, default=1024, help="sequences generated together")
    p.add_argument("--lr-router", type=float, default=1e-3)
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--probe-lrs", type=float, nargs="+", default=[5e-5, 1.5e-4, 5e-4])
    p.add_argument("--time-budget", type=float, default=360.0, help="seconds of distillation over all configs")
    p.add_argument("--deadline", type=float, default=540.0, help="start no new config after this many seconds")
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args()
    if ns.tiny:
        ns.window, ns.windows = 64, [8]
    return ns


def main() -> int:
    ns = parse_args()
    configs = [c for c in (TINY_CONFIGS if ns.tiny else CONFIGS) if not ns.only or c[0] in ns.only]
    if not configs:
        raise SystemExit(f"--only {ns.only}: no such configuration (known: {[c[0] for c in CONFIGS]})")
    ctx, base, meta = setup(ns)
    first = configs[0]
    probe_settings = replace(base, experts=first[1], top_k=first[2], shared_neurons=first[3])
    probe_student, _ = build_student(ctx["dense"], ctx["calib"], probe_settings, log, ns.device, ctx["memo"])
    lr, step_s, trials = pick_lr(ctx["teacher"], probe_student.to(ns.device), ctx["data"], probe_settings, ns.probe_lrs,
                                  ns.probe_steps)
    del probe_student
    base = replace(base, lr_experts=lr)
    budget = ns.time_budget  # seconds of distillation, shared by weight
    weights = sum(c[4] for c in configs)
    result = {**meta, "lr_probe": trials, "lr_experts": lr, "seconds_per_step": step_s, "configs": []}
    for label, experts, top_k, shared, weight in configs:
        if time.perf_counter() - T0 > ns.deadline:
            log(f"deadline reached: skipping {label}")
            continue
        steps = min(ns.max_steps, int(budget * weight / weights / step_s))
        result["configs"].append(run_config(label, experts, top_k, shared, base, steps, ctx))
        result["elapsed_s"] = round(time.perf_counter() - T0, 1)
        Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"done: {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
