"""The scheduling knobs (their meaning and unit are documented in config.py, which builds a Policy from flags/env).

Modes (the benchmark compares them; each adds one idea to the previous):
- `none`: one request at a time, run to completion (batch size 1, no waiting).
- `static`: request-level batching as in Triton's dynamic batcher and the product claim: launch a batch when
  `max_batch_size` requests wait or the oldest has waited `max_wait`; run it until every sequence in it finished;
  nothing joins a running batch. Whole prompts are prefilled in one step.
- `dynamic`: iteration-level batching (Orca): sequences join and leave at every step; when nothing runs and fewer than
  `max_batch_size` wait, wait up to `max_wait` so a burst shares one prefill. Whole prompts in one step.
- `continuous`: `dynamic` plus chunked prefill (Sarathi / vLLM v1): every step carries at most `max_step_tokens`,
  running decodes first, so a long prompt never stalls the tokens of running sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MODES = ("none", "static", "dynamic", "continuous")


@dataclass(frozen=True)
class Policy:
    """Scheduling knobs; their meaning and unit are documented once, in services/batcher/config.py."""

    mode: str = "continuous"
    max_batch_size: int = 32  # sequences
    max_wait: float = 0.1  # seconds
    max_queue: int = 1024  # requests
    max_queue_per_tenant: int = 0  # requests; 0: off
    max_step_tokens: int = 512  # tokens
    kv_watermark: float = 0.01  # fraction of KV blocks
    # seconds a waiting request may wait for a running sequence of its tenant to write the prompt prefix they share
    # (then it hits the prefix cache instead of computing it again; prefix_sharing.py); 0: never wait
    prefix_hold: float = 10.0
    retry_after_min: float = 0.05  # seconds
    retry_after_max: float = 30.0  # seconds

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        _positive("max_batch_size", self.max_batch_size)
        _positive("max_queue", self.max_queue)
        _positive("max_step_tokens", self.max_step_tokens)
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must be >= max_batch_size ({self.max_batch_size}): "
                "every running decode needs one token of the step"
            )
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {self.max_wait!r}")
        if self.max_queue_per_tenant < 0:
            raise ValueError(f"max_queue_per_tenant must be >= 0, got {self.max_queue_per_tenant!r}")
        if not self.prefix_hold >= 0:
            raise ValueError(f"prefix_hold must be >= 0 seconds, got {self.prefix_hold!r}")
        if not 0 <= self.kv_watermark < 1:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark!r}")
        if not 0 < self.retry_after_min <= self.retry_after_max:
            raise ValueError(
                f"need 0 < retry_after_min <= retry_after_max, got {self.retry_after_min!r}, {self.retry_after_max!r}"
            )

    @property
    def batch_limit(self) -> int:
        return 1 if self.mode == "none" else self.max_batch_size

    @property
    def tenant_queue_limit(self) -> int:
        return self.max_queue_per_tenant or self.max_queue

    @property
    def chunked(self) -> bool:
        return self.mode == "continuous"

    @property
    def joins_running_batch(self) -> bool:
        return self.mode in ("dynamic", "continuous")


def knob_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Policy))


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
