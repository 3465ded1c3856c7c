"""`moemesh convert`: a dense Llama-family checkpoint (HF directory or the built-in `smollm2`) -> MoE directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moemesh.convert.settings import CLUSTER_METHODS, ROUTER_WEIGHTINGS, ConvertSettings

DEFAULTS = ConvertSettings()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="turn a dense Llama checkpoint into a Mixture-of-Experts checkpoint",
                              description="Partition each FFN's neurons into experts, calibrate routers, optionally "
                                          "distill from the dense model on text it generates itself.")
    p.add_argument("--model", default="smollm2", help="built-in dense name (smollm2) or HF Llama checkpoint dir")
    p.add_argument("--out", default=None,
                   help="output directory (default: MOEMESH_HOME/models/<model>-moe-<settings hash>)")
    p.add_argument("--experts", type=int, default=DEFAULTS.experts, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="routed experts per token")
    p.add_argument("--shared-neurons", type=int, default=0, help="neurons of the always-on shared expert (0: none)")
    p.add_argument("--cluster", choices=CLUSTER_METHODS, default=DEFAULTS.cluster)
    p.add_argument("--router-weighting", choices=ROUTER_WEIGHTINGS, default=DEFAULTS.router_weighting)
    p.add_argument("--calib-tokens", type=int, default=DEFAULTS.calib_tokens, help="self-generated calibration tokens")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="tokens per self-generated sequence")
    p.add_argument("--distill-steps", type=int, default=0, help="distillation steps (0: none)")
    p.add_argument("--train-experts", action="store_true", help="distillation trains the experts, not only routers")
    p.add_argument("--distill-batch", type=int, default=DEFAULTS.distill_batch, help="sequences per step")
    p.add_argument("--distill-tokens", type=int, default=DEFAULTS.distill_tokens,
                   help="self-generated tokens distillation draws its batches from")
    p.add_argument("--lr-router", type=float, default=DEFAULTS.lr_router)
    p.add_argument("--lr-experts", type=float, default=DEFAULTS.lr_experts)
    p.add_argument("--device", default="cpu", help="torch device for generation and distillation (cpu, cuda)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def settings_from_args(ns: argparse.Namespace) -> ConvertSettings:
    return ConvertSettings(
        experts=ns.experts, top_k=ns.top_k, shared_neurons=ns.shared_neurons, cluster=ns.cluster,
        router_weighting=ns.router_weighting, calib_tokens=ns.calib_tokens, seq_len=ns.seq_len,
        distill_steps=ns.distill_steps, train_experts=ns.train_experts, distill_batch=ns.distill_batch,
        distill_tokens=ns.distill_tokens, lr_router=ns.lr_router, lr_experts=ns.lr_experts, seed=ns.seed,
    )


def run(ns: argparse.Namespace) -> int:
    from moemesh.convert.pipeline import convert
    from moemesh.home import models_dir
    from moemesh.models.registry import resolve_model

    try:
        settings = settings_from_args(ns)
        if ns.train_experts and not ns.distill_steps:
            raise ValueError("--train-experts needs --distill-steps N > 0")
        if ns.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {ns.device}: no CUDA device is available")
        dense_dir = resolve_model(ns.model, progress=not ns.quiet)
        name = Path(ns.model).name if Path(ns.model).exists() else ns.model
        out = Path(ns.out) if ns.out else models_dir() / f"{name}-moe-{settings.digest()}"
        result = convert(dense_dir, out, settings, device=ns.device, progress=not ns.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0
