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
    if config.backend == "onnxruntime":
        from moemesh.runtime.ort.experts import OrtExpertBank

        bank = OrtExpertBank.load(model_dir, experts=experts, device=str(device), spec=spec,
                                  load_format=config.load_format)
    else:
        bank = ExpertBank.load(model_dir, experts=experts, device=device, dtype=dtype, spec=spec,
                               load_format=config.load_format, quantization=config.quantization)
    shard = ExpertShard(bank, hidden_size=spec.hidden_size, num_experts=spec.num_experts, dtype=dtype, device=device)
    identity = ShardIdentity(model=config.model, shard_index=config.shard_index, num_shards=config.num_shards,
                             backend=config.backend, dtype=config.dtype, device=str(device))
    log.info("shard %d/%d hosts experts %s of layers %s (%.1f MB)", config.shard_index, config.num_shards,
             list(bank.experts), list(bank.layers), bank.weight_bytes / 1e6)
    return ExpertServicer(shard, identity, StepSpans(tracer("moemesh.expert")))


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
