"""Prometheus metrics of an expert shard (default registry, `moemesh_expert_` prefix; see moemesh.serving.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from moemesh.serving.metrics import NAMESPACE

# 50 us (one decode token on a GPU) to 10 s (a huge prefill block on a CPU).
_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

FORWARD_SECONDS = Histogram("expert_forward_compute_seconds", "Compute time of one Forward block.",
                            namespace=NAMESPACE, buckets=_SECONDS)
FORWARD_TOKENS = Histogram("expert_forward_tokens", "Tokens in one Forward block.", namespace=NAMESPACE,
                           buckets=_TOKENS)
FORWARD_BYTES = Counter("expert_forward_bytes", "Tensor payload bytes of Forward calls.", ["direction"],
                        namespace=NAMESPACE)
# M:N: one shard serves several routers (data-parallel replicas); tokens per attached router show that each one's
# tokens reach it. `router`: the router's process id on this host (shared memory) or its link name.
ROUTER_TOKENS = Counter("expert_router_tokens", "Token rows computed for each attached router.", ["router"],
                        namespace=NAMESPACE)
MERGED_BLOCKS = Counter("expert_merged_blocks", "Blocks computed in one expert batch with another router's block "
                        "of the same layer (M:N; services/expert/merged_compute.py).", namespace=NAMESPACE)
FORWARD_CALLS = Counter("expert_forward_calls", "Forward calls, by outcome.", ["outcome"], namespace=NAMESPACE)


# Children bound once: labels() is a dict lookup under a lock, and the shared-memory path observes every layer.
_CALLS = {True: FORWARD_CALLS.labels("ok"), False: FORWARD_CALLS.labels("error")}
_RECEIVED, _SENT = FORWARD_BYTES.labels("received"), FORWARD_BYTES.labels("sent")


def observe_forward(layer: int, tokens: int, bytes_in: int, bytes_out: int, compute_s: float, ok: bool) -> None:
    del layer  # per-layer labels would multiply the series by the layer count; traces carry the layer detail
    _CALLS[ok].inc()
    if bytes_in:  # 0 over shared memory (no payload bytes)
        _RECEIVED.inc(bytes_in)
    if bytes_out:
        _SENT.inc(bytes_out)
    if ok:
        FORWARD_SECONDS.observe(compute_s)
        FORWARD_TOKENS.observe(tokens)
