"""Prometheus metrics of the router (default registry, `moemesh_router_` prefix; see moemesh.serving.metrics)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from moemesh.serving.metrics import NAMESPACE
from services.router.step_trace import StepTrace

_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_CALL_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

STEP_SECONDS = Histogram("router_step_seconds", "Compute time of one batch step (forward, expert calls, sampling).",
                         namespace=NAMESPACE, buckets=_STEP_SECONDS)
STEP_TOKENS = Histogram("router_step_tokens", "Tokens (prefill + decode) in one batch step.", namespace=NAMESPACE,
                        buckets=_TOKENS)
STEP_SEQUENCES = Histogram("router_step_sequences", "Sequences in one batch step.", namespace=NAMESPACE,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STEPS = Counter("router_steps", "Batch steps, by outcome.", ["outcome"], namespace=NAMESPACE)
EXPERT_CALL_SECONDS = Histogram("router_expert_call_seconds", "Wall time of one per-layer Forward call, by shard.",
                                ["shard"], namespace=NAMESPACE, buckets=_CALL_SECONDS)
EXPERT_STEP_SECONDS = Histogram("router_expert_step_seconds", "Summed Forward wall time of one shard in one step.",
                                ["shard"], namespace=NAMESPACE, buckets=_STEP_SECONDS)
EXPERT_BYTES = Counter("router_expert_bytes", "Tensor payload bytes exchanged with expert shards.",
                       ["shard", "direction"], namespace=NAMESPACE)
EXPERT_TOKENS = Counter("router_expert_tokens", "Token rows sent to expert shards (one per token per layer).",
                        ["shard"], namespace=NAMESPACE)
KV_BLOCKS_FREE = Gauge("router_kv_blocks_free", "Free KV cache blocks.", namespace=NAMESPACE)
ACTIVE_SEQUENCES = Gauge("router_active_sequences", "Sequences holding KV cache.", namespace=NAMESPACE)


def observe_step(step: StepTrace, seconds: float, tokens: int, sequences: int, outcome: str) -> None:
    STEPS.labels(outcome).inc()
    if outcome == "ok":
        STEP_SECONDS.observe(seconds)
        STEP_TOKENS.observe(tokens)
        STEP_SEQUENCES.observe(sequences)
    for stats in step.shards.values():
        shard = stats.address
        EXPERT_STEP_SECONDS.labels(shard).observe(stats.seconds)
        EXPERT_BYTES.labels(shard, "sent").inc(stats.bytes_sent)
        EXPERT_BYTES.labels(shard, "received").inc(stats.bytes_received)
        EXPERT_TOKENS.labels(shard).inc(stats.tokens)
        calls = EXPERT_CALL_SECONDS.labels(shard)
        for seconds in stats.call_seconds:
            calls.observe(seconds)


class ExpertTokensCollector(Collector):
    """moemesh_expert_tokens_total{layer,expert}: tokens routed to each expert of each MoE layer since start.

    The counts live on the model's device (runtime/expert_load.py); they are read only when Prometheus scrapes, through
    `read` (the servicer makes it run on the engine thread), never once per step."""

    def __init__(self) -> None:
        self.read: Callable[[], dict[int, list[int]]] | None = None

    def collect(self):
        family = CounterMetricFamily(f"{NAMESPACE}_expert_tokens", "Tokens routed to each expert of each MoE layer "
                                     "(a token counts once per expert it selected).", labels=["layer", "expert"])
        counts = self.read() if self.read is not None else {}
        for layer, per_expert in counts.items():
            for expert, tokens in enumerate(per_expert):
                family.add_metric([str(layer), str(expert)], tokens)
        yield family


EXPERT_TOKENS_BY_EXPERT = ExpertTokensCollector()
REGISTRY.register(EXPERT_TOKENS_BY_EXPERT)  # one per process, like the module-level metrics above


# Prefix cache: hit rate per tenant = rate(cached) / rate(prompt) of these two counters.
PREFIX_PROMPT_TOKENS = Counter("router_prefix_cache_prompt_tokens", "Prefill tokens of work the prefix cache was asked "
                               "about, by tenant.", ["tenant"], namespace=NAMESPACE)
PREFIX_CACHED_TOKENS = Counter("router_prefix_cache_cached_tokens", "Prefill tokens served from the prefix cache "
                               "(not computed), by tenant.", ["tenant"], namespace=NAMESPACE)
KV_BLOCKS_CACHED = Gauge("router_kv_blocks_cached", "Idle KV blocks kept for their cached prefix (also free).",
                         namespace=NAMESPACE)
KV_BLOCKS_EVICTED = Counter("router_kv_blocks_evicted", "Cached KV blocks evicted (LRU) to make room.",
                            namespace=NAMESPACE)
