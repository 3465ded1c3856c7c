"""Prometheus metrics of the batcher (default registry, `moemesh_batcher_` prefix), named after vLLM's:
vllm:time_to_first_token_seconds -> moemesh_batcher_time_to_first_token_seconds, and so on."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from moemesh.serving.metrics import NAMESPACE

_SUB = "batcher"
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
_ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10)
_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

QUEUE_TIME = Histogram("request_queue_time_seconds", "Time a request waited in the queue before its first step.",
                       namespace=NAMESPACE, subsystem=_SUB, buckets=_LATENCY)
TTFT = Histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.",
                 namespace=NAMESPACE, subsystem=_SUB, buckets=_LATENCY)
ITL = Histogram("inter_token_latency_seconds", "Time between two consecutive tokens of one request.",
                namespace=NAMESPACE, subsystem=_SUB, buckets=_ITL)
E2E = Histogram("e2e_request_latency_seconds", "Time from arrival to the final event.",
                namespace=NAMESPACE, subsystem=_SUB, buckets=_LATENCY)
BATCH_SIZE = Histogram("batch_size", "Sequences in one step.", namespace=NAMESPACE, subsystem=_SUB, buckets=_SIZES)
ITERATION_TOKENS = Histogram("iteration_tokens", "Tokens (prefill + decode) in one step.",
                             namespace=NAMESPACE, subsystem=_SUB, buckets=_TOKENS)
PREEMPTIONS = Counter("num_preemptions", "Sequences preempted (KV cache full) and later recomputed.",
                      namespace=NAMESPACE, subsystem=_SUB)
ROUTER_BUSY = Gauge("router_busy_fraction", "Fraction of wall time the router spent computing steps, recent window.",
                    namespace=NAMESPACE, subsystem=_SUB)
ROUTER_BUSY_SECONDS = Counter("router_busy_seconds", "Router compute seconds of the batcher's steps.",
                              namespace=NAMESPACE, subsystem=_SUB)
RUNNING = Gauge("num_requests_running", "Sequences in the running batch.", namespace=NAMESPACE, subsystem=_SUB)
WAITING = Gauge("num_requests_waiting", "Requests queued, not yet running.", namespace=NAMESPACE, subsystem=_SUB)
KV_USAGE = Gauge("kv_cache_usage_perc", "Fraction (0-1) of the router's KV blocks in use.",
                 namespace=NAMESPACE, subsystem=_SUB)
FINISHED = Counter("request_success", "Requests ended, by finished_reason.", ["finished_reason"],
                   namespace=NAMESPACE, subsystem=_SUB)
REJECTED = Counter("requests_rejected", "Requests refused at the door, by reason (queue_full, invalid).",
                   ["reason"], namespace=NAMESPACE, subsystem=_SUB)
PROMPT_TOKENS = Counter("prompt_tokens", "Prompt tokens of admitted requests.", namespace=NAMESPACE, subsystem=_SUB)
GENERATION_TOKENS = Counter("generation_tokens", "Tokens generated.", namespace=NAMESPACE, subsystem=_SUB)
STEP_FAILURES = Counter("step_failures", "Router steps that failed, by kind (capacity, error).", ["kind"],
                        namespace=NAMESPACE, subsystem=_SUB)
STREAM_PARKS = Counter("stream_parks", "Sequences parked because their client stopped reading (backpressure.py).",
                       namespace=NAMESPACE, subsystem=_SUB)
