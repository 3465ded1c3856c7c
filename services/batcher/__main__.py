"""`python -m services.batcher` / `moemesh-batcher`: the batcher process (continuous batching in front of the router)."""

from __future__ import annotations

import sys

import grpc

from moemesh.serving.server import run_service
from services.batcher.config import BatcherConfig
from services.batcher.engine_loop import EngineLoop
from services.batcher.router_client import RouterClient
from services.batcher.servicer import BatcherServicer, add_to_server


def build(config: BatcherConfig) -> tuple[EngineLoop, RouterClient]:
    """The engine loop over a router client; call inside the running event loop, then loop.start()."""
    router = RouterClient(config.router_addr, step_timeout=config.step_timeout, trace_every=config.trace_every)
    loop = EngineLoop(router, config.policy(), busy_window=config.busy_window, router_wait=config.router_wait,
                      pipeline=config.pipeline, stream_limits=config.stream_limits())
    return loop, router


def main(argv: list[str] | None = None) -> int:
    config = BatcherConfig.load(argv)
    parts: list[tuple[EngineLoop, RouterClient]] = []

    def register(server: grpc.aio.Server) -> list[str]:
        loop, router = build(config)
        parts.append((loop, router))
        loop.start()  # connects to the router in the background (it may start after us)
        return add_to_server(BatcherServicer(loop), server)

    async def on_stop() -> None:
        for loop, router in parts:
            await loop.stop()
            await router.close()

    return run_service(config, register, name="batcher", on_stop=on_stop)


if __name__ == "__main__":
    from moemesh.serving.server import exit_now  # no ~2 s torch teardown: `moemesh up` stops all within 10 s

    exit_now(main())
