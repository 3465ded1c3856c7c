"""`python -m services.router` / `moemesh-router`: the router process.

Start-up: resolve the model, ask every shard in EXPERT_ADDRS for its placement and check that every expert of every
MoE layer is hosted exactly once (else exit with an error naming the missing experts), then load the backbone and
KV cache, then serve.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import NoReturn

import grpc
import torch

from moemesh.models.registry import resolve_model
from moemesh.runtime.engine import Engine
from moemesh.runtime.spec import load_spec
from moemesh.runtime.types import ExpertPlacement
from moemesh.serving.server import exit_now, run_service
from services.router.config import RouterConfig
from services.router.engine_worker import EngineWorker
from services.router.expert_client import GrpcShardClient
from services.router.placement import Placement, PlacementError, ReplicaSplit, check_file, check_same_model
from services.router import cuda_ipc_dispatch, pingpong
from services.router.link_choice import is_local
from services.router.shm_dispatch import ShmDispatch
from services.router.servicer import RouterServicer, add_to_server

log = logging.getLogger("services.router")
LOCAL = "local"  # placement address of experts running inside the router


@dataclass
class RouterProcess:
    """Everything the router process holds; close() releases it (server on_stop)."""

    servicer: RouterServicer
    engine: Engine
    worker: EngineWorker
    clients: list[GrpcShardClient]
    dispatch: ShmDispatch | None = None

    def close(self) -> None:
        self.worker.shutdown()
        if self.dispatch is not None:
            self.dispatch.close()
        pingpong.close(self.engine.micro)
        for client in self.clients:
            client.close()


def connect_shards(config: RouterConfig, spec):
    """(dispatch, placement, clients): ShmDispatch over EXPERT_ADDRS, or in-process experts when it is empty."""
    moe_layers, num_experts = spec.moe_layers, spec.num_experts
    if not config.expert_addrs:
        log.warning("EXPERT_ADDRS is empty: running every expert inside the router")
        return None, (ExpertPlacement(LOCAL, moe_layers, tuple(range(num_experts))),), []
    clients = [GrpcShardClient(a, call_timeout=config.expert_timeout, connect_timeout=config.connect_timeout)
               for a in config.expert_addrs]
    try:
        placement = Placement(tuple(c.placement() for c in clients))
        check_same_model([(c.address, c.info.model, c.info.dtype, tuple(c.info.experts)) for c in clients])
        per_layer = None
        if config.placement:  # declared replicas (or per-layer sets): the shards must match the file
            planned, per_layer = _planned(config.placement)
            check_file(placement.shards, planned)
            if config.expert_transport == "cuda_ipc":
                raise PlacementError("a placement file (--placement) is not supported over cuda_ipc yet: use "
                                     "--expert-transport auto, shm, dist or grpc")
        placement.validate(moe_layers, num_experts, replicas=bool(config.placement))
        dispatch = None
        if config.expert_transport in ("auto", "cuda_ipc") and not config.placement:  # same GPU first, else fall back
            dispatch = cuda_ipc_dispatch.start(clients, placement, mode=config.expert_transport, device=config.device,
                                               spec=spec, local=[is_local(c.address) for c in clients],
                                               call_timeout=config.expert_timeout)
        dispatch = dispatch or ShmDispatch.start(clients, placement, num_experts, mode=config.expert_transport,
                                     hidden_size=spec.hidden_size, top_k=spec.moe.top_k,
                                     stall_timeout=config.stall_timeout, call_timeout=config.expert_timeout,
                                     device=config.device, join_timeout=config.join_timeout,
                                     dist_host=config.dist_host)
        if per_layer is not None:  # the shards' experts differ by layer: route every slot by the file
            dispatch.split = ReplicaSplit.from_layers(per_layer, num_experts)
    except BaseException:
        for client in clients:
            client.close()
        raise
    for client in clients:  # the same weights under another name is fine; a different model fails on first call
        if client.info is not None and client.info.model != config.model:
            log.warning("expert shard %s serves model %r, the router %r", client.address, client.info.model,
                        config.model)
    return dispatch, dispatch.placement.shards, clients


def _planned(path: str) -> tuple[list[list[int]], dict | None]:
    """(expert ids per shard, {layer: expert ids per shard} of a per-layer file or None)."""
    from moemesh.runtime.placement_plan import PlacementFileError, read, read_layers

    try:
        return read(path)[0], read_layers(path)
    except PlacementFileError as exc:
        raise PlacementError(str(exc)) from None


def build_router(config: RouterConfig) -> RouterProcess:
    if config.compute_threads:
        torch.set_num_threads(config.compute_threads)
    model_dir = resolve_model(config.model)
    spec = load_spec(model_dir)
    dispatch, placement, clients = connect_shards(config, spec)
    worker = EngineWorker()
    try:
        kv_bytes = config.kv_memory_mb * 2**20 if config.kv_memory_mb else None
        engine = worker.call(  # built on the engine thread, which alone touches it afterwards
            Engine.load, model_dir, dispatch=dispatch, device=config.device, dtype=config.dtype,
            kv_blocks=config.kv_blocks, kv_memory_bytes=kv_bytes, block_size=config.block_size,
            max_context=config.max_context, model_name=config.model, load_format=config.load_format,
            quantization=config.quantization, backend=config.backend, prefix_cache=config.prefix_cache,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        engine.micro = pingpong.start(config, spec, clients, dispatch)  # second links (before serving)
    except BaseException:
        worker.shutdown()
        if dispatch is not None:
            dispatch.close()
        for client in clients:
            client.close()
        raise
    info = engine.info
    transports = dispatch.transports if dispatch is not None else (lambda: ["local"] * len(placement))
    log.info("router: %s, %d MoE layers x %d experts over %s; KV %d blocks x %d tokens, context %d", info.model,
             len(info.moe_layers), info.num_experts,
             ", ".join(f"{p.address} ({t})" for p, t in zip(placement, transports())), info.kv_blocks_total,
             info.kv_block_size, info.max_context)
    servicer = RouterServicer(engine, worker, placement, transports=transports, seq_lease=config.seq_lease,
                              steps_ahead=config.steps_ahead)
    return RouterProcess(servicer, engine, worker, clients, dispatch)


def main(argv: list[str] | None = None) -> NoReturn:
    config = RouterConfig.load(argv)
    routers: list[RouterProcess] = []

    async def register(server: grpc.aio.Server) -> list[str]:
        # Off the loop: start-up blocks on shard Info calls (and in-process test shards need the loop to answer).
        routers.append(await asyncio.to_thread(build_router, config))
        routers[0].servicer.start_sweeper()
        return add_to_server(routers[0].servicer, server)

    def on_stop() -> None:
        for router in routers:
            router.close()

    # A failed start (PlacementError, a shard not answering, a bad model) logs one line and exits 1; exit_now skips
    # the ~2 s torch teardown (for the console script too).
    exit_now(run_service(config, register, name="router", on_stop=on_stop))


if __name__ == "__main__":
    main()
