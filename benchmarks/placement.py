"""Expert placement with replicas (EPLB-style, `moemesh placement`): max/mean shard load before and after, on a
random MoE whose gate is skewed.

The model: a tiny random MoemeshLlamaMoe (16 experts, top-2, hidden 64, 4 layers). Skew: a common direction u is
added to every token embedding and s_e * u to gate row e, with s_e falling off like -log(rank + 1), so every token's
gate logit for expert e gets about s_e extra: a few experts take most tokens. Two workloads:
  same-hot:      the same experts are hot in every layer;
  per-layer-hot: the ranking is shuffled per layer (a global placement, one expert set per shard for all layers, as
                 moemesh shards host them, can only balance the sum over layers).
Method: run the in-process Engine on random token ids; the fit half's per-expert counts (the router's
moemesh_expert_tokens_total counters, moemesh/runtime/expert_load.py) give the placement (moemesh/runtime/
placement_plan.py plan); the held-out half's actual routing (topk_ids of every layer and step, recorded) is split
between shards as the router splits it (services/router/placement.py ReplicaSplit, the code the router runs), and
each shard's load is the (token, expert) slots it computes. max/mean is taken per (step, layer) (each layer waits
for its slowest shard) and averaged; "total" is over all steps and layers.

    .venv/bin/python benchmarks/placement.py            # writes benchmarks/results/placement.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moemesh.builtin.tiny import BOS_ID, EOS_IDS, MOE_ARCH, PAD_ID, tiny_config, tiny_weights  # noqa: E402
from moemesh.runtime import placement_plan  # noqa: E402
from moemesh.runtime.dispatch import Dispatch  # noqa: E402
from moemesh.runtime.engine import Engine  # noqa: E402
from moemesh.runtime.expert_load import ExpertLoad  # noqa: E402
from services.router.placement import ReplicaSplit  # noqa: E402

EXPERTS, TOP_K, LAYERS, HIDDEN = 16, 2, 4, 64


def skewed_model(out: Path, skew: float, per_layer: bool, seed: int = 0) -> Path:
    config = tiny_config(MOE_ARCH, num_experts=EXPERTS, top_k=TOP_K, hidden=HIDDEN, layers=LAYERS, heads=4,
                         kv_heads=2, intermediate=128, moe_intermediate=32, shared_expert_intermediate=0,
                         router_weighting="softmax")
    weights = tiny_weights(config, seed)
    rng = np.random.default_rng(seed + 1)
    u = rng.standard_normal(HIDDEN).astype(np.float32)
    u /= np.linalg.norm(u)
    weights["model.embed_tokens.weight"] += 0.05 * u  # [V, H]: a common component of every token
    bonus = -np.log(np.arange(EXPERTS) + 1.0)  # by rank: 0, -0.69, -1.1, ...
    for layer in range(LAYERS):
        order = rng.permutation(EXPERTS) if per_layer else np.arange(EXPERTS)
        s = np.empty(EXPERTS, np.float32)
        s[order] = bonus
        weights[f"model.layers.{layer}.mlp.gate.weight"] += skew * s[:, None] * u[None, :]  # [E, H]
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_IDS,
                                                            "pad_token_id": PAD_ID}))
    return out


class Recording(Dispatch):
    """The in-process dispatch, keeping every layer's topk_ids [T, K]."""

    def __init__(self, inner: Dispatch) -> None:
        self.inner, self.seen = inner, []

    def submit(self, layer, hidden, topk_ids, topk_weights):
        self.seen.append((layer, topk_ids.clone()))
        return self.inner.submit(layer, hidden, topk_ids, topk_weights)

    def collect(self, handle):
        return self.inner.collect(handle)


def run_workload(model_dir: Path, steps: int, seqs: int, tokens: int, seed: int):
    """(fit load {layer: [tokens per expert]}, held-out routing [(layer, topk_ids)])."""
    engine = Engine.load(model_dir, kv_blocks=64, block_size=16)
    recording = Recording(engine.dispatch)
    engine.dispatch = recording
    load = ExpertLoad.attach(engine.backbone)
    gen = torch.Generator().manual_seed(seed)
    for step in range(2 * steps):
        if step == steps:  # first half fits the placement, the second half measures it
            fit, recording.seen = load.snapshot(), []
        batch = torch.randint(3, 49152, (seqs, tokens), generator=gen).tolist()
        engine.forward_logits(batch)
    return fit, recording.seen


def shard_slots(assigned: torch.Tensor, shards: int) -> torch.Tensor:
    """[T, K] shard of each slot (-1 unused) -> [shards] slots each computes."""
    return torch.bincount(assigned[assigned >= 0].reshape(-1), minlength=shards)


def measure(routing, layouts: dict[int, list[list[int]]]) -> dict:
    """layouts: {layer: expert ids per shard} (a global placement: the same rows in every layer)."""
    split = ReplicaSplit.from_layers(layouts, EXPERTS)  # also without replicas: each slot to its one owner
    shards = len(next(iter(layouts.values())))
    ratios, total = [], torch.zeros(shards, dtype=torch.int64)
    for layer, ids in routing:
        slots = shard_slots(split.assign(layer, ids), shards)
        total += slots
        ratios.append(placement_plan.imbalance(slots.tolist()))
    return {"max_over_mean_per_layer_step": sum(ratios) / len(ratios), "worst_layer_step": max(ratios),
            "max_over_mean_total": placement_plan.imbalance(total.tolist()), "shard_slots": total.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skew", type=float, default=6.0, help="gate skew (0: the random gate as is)")
    parser.add_argument("--steps", type=int, default=4, help="prefill steps per half (fit, held out)")
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "placement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start, started = os.getloadavg()[0], time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in ("same-hot", "per-layer-hot"):
            (Path(tmp) / workload).mkdir()
            model = skewed_model(Path(tmp) / workload, args.skew, workload == "per-layer-hot")
            fit, routing = run_workload(model, args.steps, args.seqs, args.tokens, seed=0)
            weights = placement_plan.summed(fit)
            hottest = sorted(weights, reverse=True)
            for shards in (2, 4):
                base = measure(routing, {layer: placement_plan.contiguous(EXPERTS, shards) for layer in fit})
                for replicas in (0, shards, 2 * shards):
                    for mode in ("global", "per-layer"):
                        if mode == "global":
                            plan = {layer: placement_plan.plan(weights, shards, replicas) for layer in fit}
                        else:
                            plan = placement_plan.plan_layers(fit, shards, replicas)
                        rows.append({"workload": workload, "shards": shards, "replicas": replicas, "mode": mode,
                                     "before": base, "after": measure(routing, plan), "placement": plan,
                                     "hottest_expert_share": hottest[0] / sum(hottest)})
    command = "python " + " ".join(["benchmarks/placement.py", *sys.argv[1:]])
    machine = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "load_average_start": load_start, "load_average_end": os.getloadavg()[0]}
    result = {"benchmark": "placement", "command": command, "machine": machine, "skew": args.skew,
              "model": f"random MoE, {EXPERTS} experts top-{TOP_K}, {LAYERS} layers, hidden {HIDDEN}",
              "tokens_per_step": args.seqs * args.tokens, "steps_measured": args.steps,
              "seconds": round(time.perf_counter() - started, 1), "results": rows}
    table = ["| workload | shards | extra replicas per layer | placement | max/mean before (per layer-step) | after | "
             "before (total) | after (total) | worst layer-step after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        table.append(f"| {r['workload']} | {r['shards']} | {r['replicas']} | {r['mode']} | "
                     f"{b['max_over_mean_per_layer_step']:.2f} "
                     f"| {a['max_over_mean_per_layer_step']:.2f} | {b['max_over_mean_total']:.2f} | "
                     f"{a['max_over_mean_total']:.2f} | {a['worst_layer_step']:.2f} |")
    share = ", ".join(f"{w} {next(r['hottest_expert_share'] for r in rows if r['workload'] == w):.0%}"
                      for w in ("same-hot", "per-layer-hot"))
    md = "\n".join([f"# Expert placement with replicas: max/mean shard load ({result['model']}, skew {args.skew})",
                    "", f"Command: `{command}`  ", f"Machine: {machine['cpu_cores']} cores, {machine['platform']}, "
                    f"torch {machine['torch']}; load average {load_start:.2f} at start, "
                    f"{machine['load_average_end']:.2f} at end.", "",
                    f"Hottest expert's share of all routed slots (fit half): {share} (uniform: {1 / EXPERTS:.0%}).",
                    f"{args.steps} held-out prefill steps of {args.seqs * args.tokens} tokens; before = the contiguous "
                    "split every shard gets by default; after = `moemesh placement` from the fit half's counters, "
                    "tokens of replicated experts split by the router's ReplicaSplit.", "", *table, "",
                    "1.00 is perfect balance. A shard's load = the (token, expert) slots it computes. global = one "
                    "expert set per shard for all layers (`moemesh placement --global`), per-layer = one plan per "
                    "layer (`moemesh placement`, the default: shards host a different set per layer). With the same hot "
                    "experts in every layer both do the same; when the hot experts differ by layer, a global "
                    "placement balances only the sum over the layers (total columns) and its replicas, chosen from "
                    "the summed load, can make single layers worse.", ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
