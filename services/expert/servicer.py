"""moemesh.v1.Expert over gRPC: protobuf <-> tensors, the shard's compute on a worker thread, per-step spans.

Forward decodes without copying, runs ExpertShard.forward on one dedicated thread (torch parallelises inside an op;
two concurrent blocks would only contend), and encodes the [T, H] output. Errors: InvalidTensor / ValueError ->
INVALID_ARGUMENT naming the field; LayerNotHosted -> FAILED_PRECONDITION (via moemesh.serving.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from moemesh.serving import tensors
from moemesh.serving.telemetry import tracer
from moemesh.v1 import expert_pb2, expert_pb2_grpc
from services.expert.dist_server import DistServer, JoinSpec
from services.expert.shard import ExpertShard
from services.expert import cuda_ipc_server
from services.expert.shm_server import AttachSpec, ShmServer
from services.expert.step_spans import CallStats, StepSpans
from services.expert import metrics

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


@dataclass(frozen=True)
class ShardIdentity:
    """What Info reports besides the bank's own layers/experts."""

    model: str
    shard_index: int
    num_shards: int
    backend: str
    dtype: str
    device: str


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    def __init__(self, shard: ExpertShard, identity: ShardIdentity, spans: StepSpans | None = None,
                 shm_spin_s: float = 0.0) -> None:
        self._shard = shard
        self._identity = identity
        self._spans = spans or StepSpans(tracer("moemesh.expert"))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-compute")
        self._sweeper: asyncio.Task | None = None
        self._shm = ShmServer(shard, identity.dtype, shm_spin_s)  # spin: ExpertConfig.spin_us
        self._dist = DistServer(shard, identity.dtype)
        self._ipc: list[cuda_ipc_server.CudaIpcAttachment] = []  # same-GPU links (Attach with cuda_ipc set)

    async def Forward(self, request: expert_pb2.ExpertRequest, context: grpc.aio.ServicerContext):
        start_ns = time.time_ns()
        hidden = tensors.from_proto(request.hidden, name="hidden")  # [T, H]
        ids = tensors.from_proto(request.expert_ids, name="expert_ids")  # [T, K] int32
        weights = tensors.from_proto(request.weights, name="weights")  # [T, K] float32
        loop = asyncio.get_running_loop()
        error: str | None = None
        compute = 0.0
        received = len(request.hidden.data) + len(request.expert_ids.data) + len(request.weights.data)
        sent = 0
        try:
            out, compute = await loop.run_in_executor(self._pool, self._compute, request.layer, hidden, ids, weights)
            response = expert_pb2.ExpertResponse(output=tensors.to_proto(out), compute_seconds=compute)
            sent = len(response.output.data)
            return response
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            metrics.observe_forward(request.layer, hidden.shape[0] if hidden.dim() else 0, received, sent, compute,
                                    error is None)
            self._record(context, CallStats(
                layer=request.layer, tokens=int(hidden.shape[0]) if hidden.dim() else 0, bytes_received=received,
                bytes_sent=sent, compute_seconds=compute, start_ns=start_ns, end_ns=time.time_ns(), error=error,
            ))

    def _compute(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._shard.forward(layer, hidden, ids, weights)  # [T, H]
        return out, time.perf_counter() - start

    def _record(self, context: grpc.aio.ServicerContext, call: CallStats) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self._spans.record(context.peer() or "", metadata, call)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Ends idle step spans; exits when none is open (restarted by the next call)."""
        while self._spans.open_count:
            await asyncio.sleep(self._spans.idle_s / 2)
            self._spans.sweep()

    async def Info(self, request: expert_pb2.ExpertInfoRequest, context: grpc.aio.ServicerContext):
        ident, bank = self._identity, self._shard.bank
        return expert_pb2.ExpertInfo(
            model=ident.model, shard_index=ident.shard_index, num_shards=ident.num_shards,
            layers=sorted(bank.layers), experts=sorted(bank.experts), backend=ident.backend, dtype=ident.dtype,
            device=ident.device, weight_bytes=int(bank.weight_bytes),
        )

    async def Attach(self, request: expert_pb2.AttachRequest, context: grpc.aio.ServicerContext):
        if request.HasField("cuda_ipc"):  # same GPU: device buffers instead of /dev/shm
            reason = await asyncio.to_thread(self._attach_cuda_ipc, request)
            return expert_pb2.AttachResponse(ok=reason is None, reason=reason or "")
        spec = AttachSpec(shm_path=request.shm_path, max_tokens=request.max_tokens, hidden_size=request.hidden_size,
                          top_k=request.top_k, dtype=request.dtype, socket_path=request.socket_path,
                          host_id=request.host_id)
        reason = await asyncio.to_thread(self._shm.attach, spec)  # connect blocks briefly
        return expert_pb2.AttachResponse(ok=reason is None, reason=reason or "")

    async def JoinGroup(self, request: expert_pb2.JoinGroupRequest, context: grpc.aio.ServicerContext):
        spec = JoinSpec(store_address=request.store_address, group_name=request.group_name, rank=request.rank,
                        world_size=request.world_size, backend=request.backend, hidden_size=request.hidden_size,
                        top_k=request.top_k, dtype=request.dtype, timeout_ms=request.timeout_ms,
                        heartbeat_ms=request.heartbeat_ms)
        reason = await asyncio.to_thread(self._dist.join, spec)  # blocks until every rank connected
        return expert_pb2.JoinGroupResponse(ok=reason is None, reason=reason or "")

    async def Watch(self, request: expert_pb2.WatchRequest, context: grpc.aio.ServicerContext):
        # Beats from the event loop, not the compute thread: a long block on a live shard still beats.
        interval, count = max(request.interval_ms, 10) / 1000, 0
        try:
            while True:
                count += 1
                yield expert_pb2.WatchBeat(count=count)
                await asyncio.sleep(interval)
        finally:  # the router cancelled (it dropped the group) or is gone: leave that group
            if request.group_name:
                self._dist.watch_ended(request.group_name)

    def _attach_cuda_ipc(self, request: expert_pb2.AttachRequest) -> str | None:
        ident, shard = self._identity, self._shard
        reason = cuda_ipc_server.refusal(request, ident.device, ident.dtype, shard.hidden_size,
                                         tuple(shard.bank.layers))
        if reason is None:
            try:
                self._ipc = [a for a in self._ipc if a.alive]
                self._ipc.append(cuda_ipc_server.attach(shard.bank, request, str(len(self._ipc))))
            except Exception as exc:  # noqa: BLE001 -- CUDA refused the handle: the router falls back
                reason = f"{type(exc).__name__}: {exc}"
        return reason

    async def close(self) -> None:
        """Ends open step spans, the shared-memory links and process groups, and the compute thread (on_stop)."""
        for attachment in self._ipc:
            attachment.close()
        self._shm.close()
        self._dist.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._spans.close()
        self._pool.shutdown(wait=True)


def add_to_server(servicer: ExpertServicer, server: grpc.aio.Server) -> list[str]:
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    return [SERVICE_NAME]
