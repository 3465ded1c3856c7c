"""gRPC transport to one expert shard: Info at start-up, per-layer Forward calls as futures.

The channel carries no OpenTelemetry interceptor on purpose: per-layer calls would each make a client span. The
trace context travels in the metadata the caller passes (StepTrace.headers), see services/router/step_trace.py.
Sync stubs: the calls are made from the engine's worker thread, `.future()` lets all shards of a layer run at once.
"""

from __future__ import annotations

import time

import grpc
import torch

from moemesh.certs import grpc_tls
from moemesh.errors import ErrorStatus
from moemesh.runtime.engine import as_dtype
from moemesh.runtime.types import ExpertPlacement
from moemesh.serving.telemetry import CHANNEL_OPTIONS
from moemesh.serving.tensors import from_proto, to_proto
from moemesh.v1 import expert_pb2, expert_pb2_grpc
from services.router.dispatch import ForwardResult


class ExpertCallError(RuntimeError):
    """A Forward call to a shard failed; the step is rolled back. UNAVAILABLE for the batcher: retry later."""

    status = ErrorStatus.UNAVAILABLE

    def __init__(self, address: str, layer: int, code: grpc.StatusCode | None, details: str) -> None:
        name = code.name if code is not None else "ERROR"
        super().__init__(f"expert shard {address} failed on layer {layer}: {name}: {details}")
        self.address, self.layer, self.code = address, layer, code
        # A shard rejecting our input is a bug on this side, not an outage: surface it as INTERNAL.
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            self.status = ErrorStatus.INTERNAL


class _Pending:
    """A Forward future; result() decodes the output and converts RpcError into ExpertCallError."""

    def __init__(self, future: grpc.Future, address: str, layer: int, start: float) -> None:
        self._future, self._address, self._layer, self._start = future, address, layer, start
        self._done_at: float | None = None
        future.add_done_callback(self._stamp)

    def _stamp(self, _future: grpc.Future) -> None:
        self._done_at = time.perf_counter()

    def result(self) -> ForwardResult:
        try:
            response = self._future.result()
        except grpc.RpcError as exc:
            raise ExpertCallError(self._address, self._layer, exc.code(), exc.details() or "") from None
        seconds = (self._done_at or time.perf_counter()) - self._start
        output = from_proto(response.output, name="output")  # [T_i, H] read-only view of the message bytes
        return ForwardResult(output, response.compute_seconds, seconds)


class GrpcShardClient:
    """One shard: `placement()` asks its Info (waiting up to connect_timeout for it to come up)."""

    def __init__(self, address: str, *, call_timeout: float = 30.0, connect_timeout: float = 60.0) -> None:
        self.address = address
        self.call_timeout, self.connect_timeout = call_timeout, connect_timeout
        self._channel = grpc_tls.channel(address, CHANNEL_OPTIONS)  # mTLS with MOEMESH_MTLS
        self._stub = expert_pb2_grpc.ExpertStub(self._channel)
        self.info: expert_pb2.ExpertInfo | None = None
        self.dtype: torch.dtype | None = None  # the shard's compute dtype: hidden travels in it

    def placement(self) -> ExpertPlacement:
        try:
            info = self._stub.Info(expert_pb2.ExpertInfoRequest(), timeout=self.connect_timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise ConnectionError(
                f"expert shard {self.address} did not answer Info within {self.connect_timeout:.0f}s "
                f"({exc.code().name}: {exc.details()}); is it running and listed correctly in EXPERT_ADDRS?"
            ) from None
        self.info = info
        self.dtype = as_dtype(info.dtype) if info.dtype in ("float32", "bfloat16", "float16") else None
        return ExpertPlacement(self.address, tuple(info.layers), tuple(info.experts))

    def attach(self, request: expert_pb2.AttachRequest, timeout: float) -> expert_pb2.AttachResponse:
        """Expert/Attach (shared-memory data plane, services/router/shm_link.py); raises grpc.RpcError."""
        return self._stub.Attach(request, timeout=timeout)

    def join_group(self, request: expert_pb2.JoinGroupRequest, timeout: float) -> grpc.Future:
        """Expert/JoinGroup as a future (services/router/dist_link.py: every shard joins while rank 0 waits)."""
        return self._stub.JoinGroup.future(request, timeout=timeout)

    def watch(self, request: expert_pb2.WatchRequest):
        """Expert/Watch: the shard's liveness beats as a stream, until cancel() (services/router/shard_watch.py)."""
        return self._stub.Watch(request)

    def info_now(self, timeout: float) -> expert_pb2.ExpertInfo:
        """Info without waiting for the shard to come up (re-attach after a fault); raises grpc.RpcError."""
        return self._stub.Info(expert_pb2.ExpertInfoRequest(), timeout=timeout)

    def submit(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               step_id: int, headers: dict[str, str]):
        # hidden [T_i, H] -> the shard's dtype; expert_ids [T_i, K] int32; weights [T_i, K] float32
        if self.dtype is not None and hidden.dtype != self.dtype:
            hidden = hidden.to(self.dtype)
        request = expert_pb2.ExpertRequest(layer=layer, hidden=to_proto(hidden), expert_ids=to_proto(expert_ids),
                                           weights=to_proto(weights), step_id=step_id)
        start = time.perf_counter()
        future = self._stub.Forward.future(request, timeout=self.call_timeout, metadata=tuple(headers.items()))
        return _Pending(future, self.address, layer, start)

    def close(self) -> None:
        self._channel.close()
