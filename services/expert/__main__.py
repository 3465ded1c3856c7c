"""`python -m services.expert` / `moemesh-expert`: one expert shard process."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
import torch

from moemesh.models.registry import resolve_model
from moemesh.runtime.engine import as_dtype
from moemesh.runtime.experts import ExpertBank, shard_experts
from moemesh.runtime.spec import load_spec
from moemesh.serving.server import exit_now, run_service
from moemesh.serving.telemetry import tracer
from services.expert.config import ExpertConfig
from services.expert.servicer import ExpertServicer, ShardIdentity, add_to_server
from services.expert.shard import ExpertShard
from services.expert.step_spans import StepSpans

log = logging.getLogger("services.expert")


def build_servicer(config: ExpertConfig) -> ExpertServicer:
    """Loads the shard's experts (only the hosted tensors are read) and wraps them in the servicer."""
    if config.compute_threads:
        torch.set_num_threads(config.compute_threads)
    model_dir = resolve_model(config.model)
    spec = load_spec(model_dir)
    if spec.moe is None:
        raise ValueError(f"{config.source('model')}: {config.model!r} is a dense model; there are no experts to host")
    experts = config.expert_list()
    if experts is None:
        experts = shard_experts(spec.num_experts, config.num_shards, config.shard_index)
    dtype, device = as_dtype(config.dtype), torch.device(config.device)
    by_layer = _layers_of(config)
    if by_layer is not None:  # experts differ by layer: one ExpertBank per expert set
        from services.expert.layered_bank import LayeredBank

        bank = LayeredBank.load(model_dir, by_layer, device=device, dtype=dtype, spec=spec,
                                load_format=config.load_format, quantization=config.quantization)
    elif config.backend == "onnxruntime":
        from moemesh.runtime.ort.experts import OrtExpertBank

        bank = OrtExpertBank.load(model_dir, experts=experts, device=str(device), spec=spec,
                                  load_format=config.load_format)
    else:
        bank = ExpertBank.load(model_dir, experts=experts, device=device, dtype=dtype, spec=spec,
                               load_format=config.load_format, quantization=config.quantization,
                               packed=config.backend == "packed")
    shard = ExpertShard(bank, hidden_size=spec.hidden_size, num_experts=spec.num_experts, dtype=dtype, device=device)
    identity = ShardIdentity(model=config.model, shard_index=config.shard_index, num_shards=config.num_shards,
                             backend=config.backend, dtype=config.dtype, device=str(device))
    hosts = (f"experts {list(bank.experts)} of layers {list(bank.layers)}" if by_layer is None else
             "experts per layer " + "; ".join(f"{layer}: {list(e)}" for layer, e in sorted(by_layer.items())))
    log.info("shard %d/%d hosts %s (%.1f MB)", config.shard_index, config.num_shards, hosts, bank.weight_bytes / 1e6)
    spin_s = config.spin_seconds()
    if spin_s:
        log.info("shared-memory links poll %.0f us for the next request before blocking", spin_s * 1e6)
    return ExpertServicer(shard, identity, StepSpans(tracer("moemesh.expert")), shm_spin_s=spin_s)


def _layers_of(config: ExpertConfig) -> dict[int, list[int]] | None:
    """{layer: experts} of this shard from a per-layer placement file, or None (one set for all layers)."""
    if not config.placement:
        return None
    from moemesh.runtime.placement_plan import read_layers

    per_layer = read_layers(config.placement)
    if per_layer is None:  # a global file: its entry is this shard's one set
        raise ValueError(f"{config.source('placement')}: {config.placement!r} is not a per-layer file; start the "
                         "shard with --experts (its entry of 'shards') instead")
    if config.backend != "torch":
        raise ValueError(f"{config.source('placement')}: a per-layer placement needs backend torch")
    if not 0 <= config.shard_index < len(next(iter(per_layer.values()))):
        raise ValueError(f"{config.source('shard_index')}: {config.shard_index} has no entry in {config.placement!r}")
    return {layer: rows[config.shard_index] for layer, rows in per_layer.items()}


def main(argv: list[str] | None = None) -> NoReturn:
    config = ExpertConfig.load(argv)
    servicers: list[ExpertServicer] = []

    def register(server: grpc.aio.Server) -> list[str]:
        servicers.append(build_servicer(config))
        return add_to_server(servicers[0], server)

    async def on_stop() -> None:
        for servicer in servicers:
            await servicer.close()

    # A failed start logs why and exits 1. exit_now skips the ~2 s torch teardown (console script too).
    exit_now(run_service(config, register, name="expert", on_stop=on_stop))


if __name__ == "__main__":
    main()
