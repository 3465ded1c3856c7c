"""In-process test helper: a real server on a free port inside the test's event loop, real sockets, real stubs.

    async with serve_in_process(register, name="tokenizer") as svc:
        channel = client_channel(svc.address)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from moemesh.serving.config import ServiceConfig
from moemesh.serving.server import OnStop, Register, RunningService, start_service


@contextlib.asynccontextmanager
async def serve_in_process(register: Register, *, name: str = "test", config: ServiceConfig | None = None,
                           on_stop: OnStop | None = None, grace: float = 0.0) -> AsyncIterator[RunningService]:
    """Starts the service on 127.0.0.1:0 (metrics off unless `config` says otherwise); stops it on exit."""
    config = config or ServiceConfig(port=0, metrics_port=-1, grace=grace)
    running = await start_service(config, register, name=name, on_stop=on_stop)
    try:
        yield running
    finally:
        await running.stop(grace)
