"""Settings of the batcher process (flags, then MOEMESH_BATCHER_* env, then defaults). Every scheduling knob, with
its meaning and unit; services/batcher/policy.py explains the four modes.

| knob                  | default    | meaning                                                                  |
|-----------------------|------------|--------------------------------------------------------------------------|
| mode                  | continuous | none, static, dynamic or continuous batching                             |
| max_batch_size        | 32         | most sequences in one step (the running batch)                           |
| max_wait_ms           | 100        | idle engine, fewer than max_batch_size queued: wait this long for more   |
| max_queue             | 1024       | most requests waiting over all tenants; beyond: RESOURCE_EXHAUSTED       |
| max_queue_per_tenant  | 0          | most requests waiting per tenant (0: only max_queue)                     |
| max_step_tokens       | 512        | continuous mode: most tokens per step, decodes + prefill chunks          |
| kv_watermark          | 0.01       | fraction of KV blocks kept free when admitting, so running ones can grow |
| prefix_hold           | 10         | seconds a request waits for a running one to write their shared prefix   |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moemesh.serving.config import ROUTER_ADDR, ConfigError, ServiceConfig, check_address, setting
from services.batcher.backpressure import Limits
from services.batcher.policy import MODES, Policy


@dataclass(frozen=True)
class BatcherConfig(ServiceConfig):
    """The batcher: queues tokenized prompts and decides, at every step, what the router computes."""

    SERVICE: ClassVar[str] = "batcher"

    port: int = setting(50053, "gRPC port (0: any free port)")
    router_addr: str = setting("127.0.0.1:50054", "address of the router (host:port)", env=ROUTER_ADDR)
    mode: str = setting("continuous", "batching mode (see services/batcher/policy.py)", choices=MODES)
    max_batch_size: int = setting(32, "most sequences in one step, in sequences")
    max_wait_ms: float = setting(
        100.0, "milliseconds an idle engine with fewer than max_batch_size queued waits for more arrivals"
    )
    max_queue: int = setting(1024, "most requests waiting over all tenants, in requests; beyond: RESOURCE_EXHAUSTED")
    max_queue_per_tenant: int = setting(0, "most requests waiting per tenant, in requests (0: only max_queue)")
    max_step_tokens: int = setting(512, "continuous mode: most tokens per step (decode tokens + prefill chunks)")
    kv_watermark: float = setting(0.01, "fraction (0-1) of KV blocks kept free when admitting a new sequence")
    prefix_hold: float = setting(10.0, "seconds a waiting request may wait for a running sequence of its tenant to "
                                 "write the prompt prefix they share, then hit it in the prefix cache instead of "
                                 "computing it again (prefix_sharing.py); 0: never wait")
    retry_after_min_ms: float = setting(50.0, "smallest retry-after hint with RESOURCE_EXHAUSTED, in milliseconds")
    retry_after_max_ms: float = setting(30000.0, "largest retry-after hint with RESOURCE_EXHAUSTED, in milliseconds")
    step_timeout: float = setting(120.0, "seconds one Router.Step call may take before the step fails")
    router_wait: float = setting(60.0, "seconds Generate waits for the router to answer Info (start-up order)")
    busy_window: float = setting(10.0, "seconds of history in router_busy_fraction")
    stream_buffer: int = setting(128, "undelivered events of one stream (its client does not read) that park its "
                                 "sequence: out of the batch until the client has read them all (backpressure.py)")
    stall_s: float = setting(120.0, "seconds a parked stream's client may read nothing before it is cancelled")
    pipeline: bool = setting(True, "send the next decode step before the current step's result is back (step "
                             "pipelining: the router never waits for the batcher's round trip)")
    trace_every: int = setting(16, "trace every Nth batch step through router and shards, besides each step that "
                               "starts a sequence (router_client.py, Sampling); 1: every step")

    def validate(self) -> None:
        super().validate()
        check_address(self.router_addr, self.source("router_addr"))
        for name in ("step_timeout", "router_wait", "busy_window", "stall_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{self.source(name)}: {getattr(self, name)!r} must be > 0 seconds")
        for name in ("max_batch_size", "max_queue", "max_step_tokens", "stream_buffer", "trace_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.source(name)}: {getattr(self, name)!r} must be >= 1")
        if self.max_step_tokens < self.max_batch_size:
            raise ConfigError(
                f"{self.source('max_step_tokens')}: {self.max_step_tokens!r} must be >= max_batch_size "
                f"({self.max_batch_size}): every running decode needs one token of the step"
            )
        for name in ("max_wait_ms", "max_queue_per_tenant"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{self.source(name)}: {getattr(self, name)!r} must be >= 0")
        if not 0 <= self.prefix_hold < float("inf"):  # also refuses nan
            raise ConfigError(f"{self.source('prefix_hold')}: {self.prefix_hold!r} must be >= 0 seconds "
                              "(0: never wait)")
        if not 0 <= self.kv_watermark < 1:
            raise ConfigError(f"{self.source('kv_watermark')}: {self.kv_watermark!r} is not a fraction in [0, 1)")
        if not 0 < self.retry_after_min_ms <= self.retry_after_max_ms:
            raise ConfigError(
                f"{self.source('retry_after_min_ms')}: {self.retry_after_min_ms!r} must be > 0 and <= "
                f"retry_after_max_ms ({self.retry_after_max_ms!r})"
            )

    def stream_limits(self) -> Limits:
        return Limits(high=self.stream_buffer, low=0, stall_s=self.stall_s)

    def policy(self) -> Policy:
        return Policy(
            mode=self.mode,
            max_batch_size=self.max_batch_size,
            max_wait=self.max_wait_ms / 1000,
            max_queue=self.max_queue,
            max_queue_per_tenant=self.max_queue_per_tenant,
            max_step_tokens=self.max_step_tokens,
            kv_watermark=self.kv_watermark,
            prefix_hold=self.prefix_hold,
            retry_after_min=self.retry_after_min_ms / 1000,
            retry_after_max=self.retry_after_max_ms / 1000,
        )
