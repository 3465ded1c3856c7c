"""Pieces of benchmarks/chaos.py: a load backend that remembers each request's id and outcome, the probe that says
when the mesh serves again, the ledger read (admin token), and the scan for processes a kill left behind.

The load loop itself is moemesh bench's (moemesh/bench/load.py LoadRun, closed loop); `UntilStopped` ends it when
the chaos schedule is done rather than after a count or a duration.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from moemesh.bench.backends import GrpcBackend
from moemesh.bench.stats import RequestRecord
from moemesh.bench.workload import LoadSpec
from moemesh.sdk.client import build_request
from moemesh.v1 import metering_pb2, metering_pb2_grpc


RETRY_PAUSE_S = 0.2  # a client pauses after a failure (as a real one backs off) rather than spinning on a dead port


@dataclass(frozen=True)
class UntilStopped(LoadSpec):
    """A LoadSpec whose closed loop sends until `stop` is set (duration_s is only the validation's bound)."""

    stop: asyncio.Event = field(default_factory=asyncio.Event, compare=False)

    def more(self, sent: int, elapsed_s: float) -> bool:
        return not self.stop.is_set()


@dataclass
class Outcome:
    request_id: str = ""
    start: float = 0.0  # time.monotonic()
    end: float = 0.0
    completion_tokens: int = 0  # from the usage chunk (what the client was told it got)
    completed: bool = False  # a finish_reason and usage arrived, no error
    error: str = ""  # "CODE: message" (status or in-band)
    probe: bool = False  # a serving-again probe, not load: never counted as failed, but matched to the ledger


class TrackedBackend(GrpcBackend):
    """moemesh bench's gRPC backend, keeping one Outcome per request (ids to match against the ledger)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: list[Outcome] = []

    async def send(self, prompt, spec, record, clock) -> None:
        out = Outcome(start=time.monotonic())
        self.outcomes.append(out)
        try:
            stub = await self._ready()
            request = build_request(prompt, model=self.model, stream_usage=True, max_tokens=spec.max_tokens,
                                    temperature=spec.temperature, ignore_eos=spec.ignore_eos or None)
            finished = False
            async for chunk in stub.StreamChatCompletion(request, metadata=self._metadata, timeout=self.timeout_s):
                out.request_id = out.request_id or chunk.id
                if chunk.HasField("error"):
                    out.error = f"{chunk.error.code}: {chunk.error.message}"
                    raise RuntimeError(out.error)
                if chunk.choices and chunk.choices[0].delta.content:
                    record.chunk_times.append(clock())
                finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
                if chunk.HasField("usage"):
                    out.completion_tokens = record.output_tokens = chunk.usage.completion_tokens
            out.completed = finished
        except grpc.aio.AioRpcError as exc:
            out.error = f"{exc.code().name}: {exc.details()}"
            raise RuntimeError(out.error) from None
        finally:
            out.end = time.monotonic()
            if not out.completed:
                await asyncio.sleep(RETRY_PAUSE_S)


async def serving_again(backend: TrackedBackend, since: float, limit_s: float = 90.0) -> float | None:
    """Seconds from `since` until a short chat completes (tried every 0.5 s); None when not within limit_s."""
    spec = LoadSpec(requests=1, prompt_tokens=4, max_tokens=2)
    while time.monotonic() - since < limit_s:
        probe = TrackedBackend(backend.target, None, backend.model, 5.0)
        probe._metadata = backend._metadata
        try:
            await probe.send("probe", spec, RequestRecord(start=0.0), time.perf_counter)
            return time.monotonic() - since
        except Exception:
            await asyncio.sleep(0.5)
        finally:
            for o in probe.outcomes:  # probes are client-observed completions too (ledger check)
                o.probe = True
            backend.outcomes += probe.outcomes
            await probe.close()
    return None


def ledger(metering_addr: str, home: Path, tenant: str = "default") -> list[metering_pb2.UsageRecord]:
    token = (home / "secrets" / "admin_token").read_text().strip()
    with grpc.insecure_channel(metering_addr) as channel:
        stub = metering_pb2_grpc.MeteringStub(channel)
        query = metering_pb2.GetUsageRequest(tenant=tenant)
        return list(stub.ExportUsage(query, metadata=[("x-moemesh-admin-token", token)], timeout=60))


def group_alive(pgid: int, exclude: set[int] = frozenset()) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, except `exclude`."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(int(entry))
    return alive
