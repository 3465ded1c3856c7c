"""Bootstrap of every moemesh service process: a grpc.aio server with health, reflection, the OTel and status
interceptors, Prometheus metrics, and graceful shutdown.

    def register(server: grpc.aio.Server) -> list[str]:
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(...), server)
        return [tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name]

    def main() -> int:
        return run_service(TokenizerConfig.load(), register, name="tokenizer")

`register` runs inside the event loop (so it may create client channels) and may be async. Shutdown on SIGTERM or
SIGINT: health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get `config.grace` seconds to finish,
then `on_stop` runs (close channels, stop engines) and the process exits 0. A second signal cuts the grace short.
`on_drain(grace)` runs when draining starts: a service with long streams ends them in-band before the grace is over.
When MOEMESH_READY_FILE is set, a JSON file {name, address, port, metrics_port, pid} is written there once serving.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moemesh.certs import grpc_tls
from moemesh.serving import metrics, telemetry
from moemesh.serving.config import ServiceConfig
from moemesh.serving.interceptors import DrainState, StatusInterceptor
from moemesh.serving.logging import setup_logging

log = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server], "Sequence[str] | Awaitable[Sequence[str]]"]
OnStop = Callable[[], "Awaitable[None] | None"]
OnDrain = Callable[[float | None], None]  # told the grace when draining starts (e.g. to end long streams in-band)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
READY_FILE_ENV = "MOEMESH_READY_FILE"
_WILDCARD_HOSTS = {"0.0.0.0", "[::]", "::", ""}
# SO_REUSEPORT off: a second process on the same port must fail to start, not silently share the port.
# Metadata up to 1 MiB: grpc's own 8 KiB soft / 16 KiB hard limits would answer big headers with a misleading
# RESOURCE_EXHAUSTED (a "rate limit" to OpenAI clients); the edge's header limits (60 KiB) answer first instead.
SERVER_OPTIONS = (*telemetry.CHANNEL_OPTIONS, ("grpc.so_reuseport", 0), ("grpc.max_metadata_size", 1 << 20),
                  ("grpc.absolute_max_metadata_size", 1 << 20))


@dataclass
class RunningService:
    """A started server. `address` is dialable (a wildcard host becomes 127.0.0.1)."""

    name: str
    server: grpc.aio.Server
    host: str
    port: int
    service_names: tuple[str, ...]
    health: health.aio.HealthServicer
    metrics_port: int | None
    drain: DrainState
    on_stop: OnStop | None = None
    _metrics_http: object | None = None
    on_drain: OnDrain | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None) -> None:
        """Drain: NOT_SERVING, refuse new calls, give in-flight calls `grace` seconds, then on_stop. Idempotent."""
        if self.drain.draining:
            await self._stopped.wait()
            return
        self.drain.draining = True
        if self.on_drain is not None:
            self.on_drain(grace)
        metrics.SERVICE_UP.labels(self.name).set(0)
        await self.health.enter_graceful_shutdown()
        log.info("%s draining (grace %.1fs)", self.name, grace or 0.0)
        await self.server.stop(grace)
        try:
            if self.on_stop is not None:
                result = self.on_stop()
                if inspect.isawaitable(result):
                    await result
        finally:
            if self._metrics_http is not None:
                self._metrics_http.shutdown()  # type: ignore[attr-defined]
            self._stopped.set()
            log.info("%s stopped", self.name)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def start_service(config: ServiceConfig, register: Register, *, name: str,
                        on_stop: OnStop | None = None, on_drain: OnDrain | None = None) -> RunningService:
    """Builds, binds and starts the server inside the running loop; all services SERVING when it returns."""
    drain = DrainState()
    server = grpc.aio.server(
        interceptors=[telemetry.server_interceptor(), StatusInterceptor(name, drain)], options=SERVER_OPTIONS
    )
    names = register(server)
    if inspect.isawaitable(names):
        names = await names
    names = tuple(names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    try:
        port = grpc_tls.listen(server, config.address, name)  # plaintext, or mTLS with MOEMESH_MTLS
    except RuntimeError:
        port = 0
    if port == 0:
        await server.stop(None)
        raise OSError(f"{name}: cannot listen on {config.address!r} (port in use, or a bad host?)")
    metrics_http = None
    metrics_port = None
    if config.metrics_port >= 0:
        metrics_http, metrics_port = _start_metrics(config)
    await server.start()
    for service in (*names, ""):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    metrics.SERVICE_UP.labels(name).set(1)
    running = RunningService(name, server, config.host, port, names, health_servicer, metrics_port, drain,
                             on_stop, metrics_http, on_drain)
    log.info("%s serving %s on %s (metrics port %s)", name, ", ".join(names), running.address, metrics_port)
    return running


def _start_metrics(config: ServiceConfig) -> tuple[object, int]:
    chosen = config.metrics_host or config.host  # the service's own interface unless configured
    host = "0.0.0.0" if chosen in _WILDCARD_HOSTS else chosen
    return metrics.start_metrics_server(config.metrics_port, host)


def write_ready_file(path: Path, running: RunningService) -> None:
    """Atomically writes {name, address, port, metrics_port, pid} (read by `moemesh up`)."""
    info = {"name": running.name, "address": running.address, "port": running.port,
            "metrics_port": running.metrics_port, "pid": os.getpid()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


async def serve_until_signal(config: ServiceConfig, register: Register, *, name: str,
                             on_stop: OnStop | None = None, on_drain: OnDrain | None = None) -> None:
    running = await start_service(config, register, name=name, on_stop=on_stop, on_drain=on_drain)
    loop = asyncio.get_running_loop()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        signals.append(signum)
        if len(signals) == 1:
            log.info("%s got %s: shutting down", name, signal.Signals(signum).name)
            loop.create_task(running.stop(config.grace))
        else:  # a second signal: cancel in-flight calls now
            loop.create_task(running.server.stop(0))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    ready = os.environ.get(READY_FILE_ENV)
    if ready:
        write_ready_file(Path(ready), running)
    await running.wait_stopped()


def run_service(config: ServiceConfig, register: Register, *, name: str, on_stop: OnStop | None = None,
                on_drain: OnDrain | None = None) -> int:
    """Runs a service process until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    setup_logging(name, config.log_level)
    telemetry.setup_tracing(name)
    try:
        asyncio.run(serve_until_signal(config, register, name=name, on_stop=on_stop, on_drain=on_drain))
    except Exception as exc:  # a failed start: say why in one line (with the traceback when it is a bug)
        expected = isinstance(exc, (OSError, ValueError, LookupError, NotImplementedError))
        log.error("%s failed: %s", name, exc, exc_info=not expected)
        return 1
    finally:
        telemetry.flush_tracing()
        log.info("%s exiting", name)
    return 0


def exit_now(code: int) -> NoReturn:
    """Ends the process at once, skipping interpreter teardown (with torch loaded it takes ~2 s on a busy machine,
    time that counts against `moemesh up`'s 10 s stop budget). Call it last in a service's main(), after
    run_service returned and anything else was cleaned up; logs and stdio are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
