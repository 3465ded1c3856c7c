"""moemesh.v1.Router over gRPC: protobuf <-> runtime dataclasses, every engine call on the one engine thread.

Status mapping: CapacityError -> RESOURCE_EXHAUSTED (nothing of the step applied), SequenceStateError (position
mismatch, unknown sequence, context too long) and other bad input -> INVALID_ARGUMENT, an expert shard failing ->
UNAVAILABLE (the engine rolled the step back). Spans: see services/router/step_trace.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from opentelemetry import trace

from moemesh.runtime.engine import Engine
from moemesh.runtime.expert_load import ExpertLoad
from moemesh.runtime.prefix_cache import cache_salt
from moemesh.runtime.types import (
    CapacityError, ExpertPlacement, Guided, SamplingParams, SequenceResult, SequenceStateError, SequenceWork,
)
from moemesh.errors import ErrorStatus, ServiceError
from moemesh.serving.telemetry import tracer
from moemesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.router import metrics
from services.router.engine_worker import EngineWorker
from services.router.leases import SequenceLeases
from services.router.prefix_stats import PrefixStats
from services.router.step_trace import step_scope
from services.router.steps_ahead import StepsAhead

log = logging.getLogger(__name__)
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
_DEFAULTS = SamplingParams()


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """proto3 zeros mean "off"/"default": top_p 0 -> 1 (off), max_tokens 0 -> the runtime default."""
    return SamplingParams(
        temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, max_tokens=p.max_tokens or _DEFAULTS.max_tokens,
        stop_token_ids=tuple(p.stop_token_ids), stop=tuple(p.stop), logprobs=p.logprobs,
        top_logprobs=p.top_logprobs, ignore_eos=p.ignore_eos,
        logit_bias=tuple((b.token_id, b.bias) for b in p.logit_bias),
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        guided=Guided(p.guided.json_schema, p.guided.json_object) if p.HasField("guided") else None,
        prompt_tokens=p.prompt_tokens if p.HasField("prompt_tokens") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
    )


def work_from_proto(w: router_pb2.SequenceWork) -> SequenceWork:
    """No sampling field: the engine uses the sequence's own (sent once, when it started)."""
    sampling = sampling_from_proto(w.sampling) if w.HasField("sampling") else None
    return SequenceWork(seq_id=w.seq_id, token_ids=list(w.token_ids), position=w.position, sampling=sampling,
                        sample=w.sample, salt=cache_salt(w.tenant, w.cache_salt), follows=w.follows)


def result_to_proto(r: SequenceResult) -> router_pb2.SequenceResult:
    out = router_pb2.SequenceResult(seq_id=r.seq_id, logprob=r.logprob or 0.0, cached_tokens=r.cached_tokens)
    if r.token_id is not None:
        out.token_id = r.token_id
    out.top_logprobs.extend(common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in r.top_logprobs)
    for entry in r.prompt_logprobs:  # runtime/prompt_logprobs.PromptLogprob
        out.prompt_logprobs.add(logprob=entry.logprob, top_logprobs=[
            common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in entry.top])
    return out


class RouterServicer(router_pb2_grpc.RouterServicer):
    ORDER_WAIT = 0.05  # seconds a pipelined Step waits for the step it follows to reach the engine thread

    def __init__(self, engine: Engine, worker: EngineWorker, placement: tuple[ExpertPlacement, ...],
                 tracer_: trace.Tracer | None = None, transports: Callable[[], list[str]] | None = None,
                 seq_lease: float = 30.0, steps_ahead: bool = True) -> None:
        self._engine, self._worker, self._placement = engine, worker, placement
        # A new id per process: a batcher that sees it change knows the KV cache it relied on is gone (recompute).
        self.instance_id = uuid.uuid4().hex
        self._leases = SequenceLeases(seq_lease)
        self._prefix = PrefixStats()  # prefix-cache hits per tenant
        self._sweeper: asyncio.Task | None = None
        self._handed = 0  # step_id of the last Step handed to the engine thread (pipelined steps wait for theirs)
        self._ahead = StepsAhead(engine, steps_ahead)  # launches an offered step behind the running one
        self._transports = transports or (lambda: [""] * len(placement))  # per shard: "shm", "grpc", "local"...
        self._tracer = tracer_ or tracer("moemesh.router")
        # Routed-token counters on the device; read on the engine thread (never inside a step), only when asked.
        self._expert_load = ExpertLoad.attach(engine.backbone)
        if self._expert_load is not None:
            metrics.EXPERT_TOKENS_BY_EXPERT.read = self._scrape_expert_load

    def start_sweeper(self) -> None:
        """Frees, every ttl/4 seconds, the KV cache of sequences no batcher stepped for ttl (see leases.py)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="router-kv-leases")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._leases.ttl / 4)
            await self.sweep()

    async def sweep(self) -> int:
        """Releases the sequences whose lease expired; returns how many the engine still held."""
        released, free = await self._worker.run(self._sweep)
        if released:
            log.warning("freed the KV cache of %d sequences no batcher stepped for %.1f s (a batcher died or "
                        "stalled); %d blocks free", released, self._leases.ttl, free)
        return released

    def _sweep(self) -> tuple[int, int]:
        # On the engine thread, like every lease update: a step in flight has touched its sequences by now.
        stale = self._leases.expired()
        return self._release(stale) if stale else (0, self._engine.blocks.free_blocks)

    async def Step(self, request: router_pb2.StepRequest, context: grpc.aio.ServicerContext):
        works = [work_from_proto(w) for w in request.work]
        tenants = {w.seq_id: w.tenant for w in request.work if w.tenant}
        if any(w.follows for w in works):  # pipelined: must reach the engine thread after the step it follows
            await self._after_step(request.step_id - 1)
        self._handed = request.step_id
        if not request.release:  # the engine thread may launch it while the step before it still runs
            self._ahead.offer(request.step_id, works)
        released, results, seconds, (free, cached, own) = await self._worker.run(
            self._release_and_step, list(request.release), request.step_id, works, tenants)
        return router_pb2.StepResponse(results=[result_to_proto(r) for r in results], compute_seconds=seconds,
                                       kv_blocks_free=free, tokens=_fed(works),
                                       kv_blocks_cached=cached, kv_blocks_own=own, released=released)

    async def _after_step(self, step_id: int) -> None:
        """Waits (at most ORDER_WAIT) until step `step_id` was handed to the engine thread. The batcher sends a
        pipelined step right after the one it follows, on the same channel, so this almost never waits; if the
        calls were reordered anyway, running it first would fail it (positions ahead of the cache)."""
        deadline = time.monotonic() + self.ORDER_WAIT
        while self._handed < step_id and time.monotonic() < deadline:
            await asyncio.sleep(0.0005)

    def _release_and_step(self, release: list[str], step_id: int, works: list[SequenceWork],
                          tenants: dict[str, str]) -> tuple[int, list[SequenceResult], float, tuple]:
        """Releases first, even when the step then fails (the batcher has already forgotten those sequences)."""
        released = self._release(release)[0] if release else 0
        self._prefix.started(works, tenants)
        results, seconds, _ = self._step(step_id, works)
        self._prefix.observe(works, results)
        return released, results, seconds, self._kv_figures(works)

    def _kv_figures(self, works: list[SequenceWork]) -> tuple[int, int, dict[str, int]]:
        """Free and cached blocks, and own blocks of the step's sequences and of those whose sharing changed."""
        blocks = self._engine.blocks
        ids = blocks.take_dirty() | {w.seq_id for w in works}
        return blocks.free_blocks, blocks.cached_blocks, {i: blocks.own(i) for i in ids if i in blocks}

    def _step(self, step_id: int, works: list[SequenceWork]) -> tuple[list[SequenceResult], float, int]:
        """On the engine thread: one router.step span, the engine step, metrics."""
        tokens = _fed(works)
        start, outcome = time.perf_counter(), "error"
        with step_scope(step_id, self._tracer) as step:
            trace.get_current_span().set_attributes({"moemesh.sequences": len(works), "moemesh.tokens": tokens})
            try:
                results = self._ahead.step(step_id, works)
                self._leases.touch(w.seq_id for w in works)  # after the step: a long step never counts as idle
                outcome = "ok"
            except CapacityError as exc:
                outcome = "capacity"
                raise ServiceError(str(exc), status=ErrorStatus.RESOURCE_EXHAUSTED) from exc
            except SequenceStateError as exc:
                outcome = "invalid"
                raise ServiceError(str(exc), status=ErrorStatus.INVALID_ARGUMENT) from exc
            finally:
                seconds = time.perf_counter() - start
                metrics.observe_step(step, seconds, tokens, len(works), outcome)
                self._update_gauges()
        return results, seconds, self._engine.blocks.free_blocks

    def _update_gauges(self) -> None:
        info = self._engine.info
        metrics.KV_BLOCKS_FREE.set(info.kv_blocks_free)
        metrics.ACTIVE_SEQUENCES.set(info.active_sequences)
        self._prefix.gauges(info.kv_blocks_cached, info.kv_blocks_evicted)

    async def Release(self, request: router_pb2.ReleaseRequest, context: grpc.aio.ServicerContext):
        released, free = await self._worker.run(self._release, list(request.seq_ids))
        return router_pb2.ReleaseResponse(released=released, kv_blocks_free=free)

    def _release(self, seq_ids: list[str]) -> tuple[int, int]:
        released = self._engine.release(seq_ids)
        self._leases.forget(seq_ids)
        self._prefix.forget(seq_ids)
        self._update_gauges()
        return released, self._engine.blocks.free_blocks

    async def Info(self, request: router_pb2.RouterInfoRequest, context: grpc.aio.ServicerContext):
        info, load = await self._worker.run(lambda: (self._engine.info, self._expert_load_snapshot()))
        return router_pb2.RouterInfo(
            model=info.model, architecture=info.architecture, max_context=info.max_context,
            kv_block_size=info.kv_block_size, kv_blocks_total=info.kv_blocks_total,
            kv_blocks_free=info.kv_blocks_free, active_sequences=info.active_sequences, vocab_size=info.vocab_size,
            num_layers=info.num_layers, num_experts=info.num_experts, experts_per_token=info.experts_per_token,
            placement=[router_pb2.ExpertPlacement(address=p.address, layers=p.layers, experts=p.experts,
                                                  transport=t) for p, t in zip(self._placement, self._transports())],
            device=info.device, dtype=info.dtype, eos_token_ids=info.eos_token_ids, moe_layers=info.moe_layers,
            expert_tokens=[router_pb2.ExpertLayerLoad(layer=layer, tokens=tokens) for layer, tokens in load.items()],
            instance_id=self.instance_id, cuda_graphs=info.cuda_graphs, quantization=info.quantization,
            backend=info.backend,
            prefix_cache=info.prefix_cache, kv_blocks_cached=info.kv_blocks_cached,
            kv_blocks_evicted=info.kv_blocks_evicted, kv_cache_dtype=info.kv_cache_dtype,
            prefix_cache_tenants=[router_pb2.TenantCacheStats(tenant=t, prompt_tokens=h.prompt_tokens,
                                                              cached_tokens=h.cached_tokens)
                                  for t, h in sorted(self._prefix.tenants.items())],
        )

    def _scrape_expert_load(self) -> dict[int, list[int]]:
        """For the metrics thread: waits for the engine thread (at most one step); nothing once the router closed."""
        try:
            return self._worker.call(self._expert_load_snapshot)
        except RuntimeError:  # the worker was shut down
            return {}

    def _expert_load_snapshot(self) -> dict[int, list[int]]:
        return self._expert_load.snapshot() if self._expert_load is not None else {}


def _fed(works: list[SequenceWork]) -> int:
    """Tokens the works feed (a follows work feeds the one token the engine sampled last)."""
    return sum(1 if w.follows else len(w.token_ids) for w in works)


def add_to_server(servicer: RouterServicer, server: grpc.aio.Server) -> list[str]:
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    return [SERVICE_NAME]
