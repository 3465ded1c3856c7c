"""Per-request timings and their summary (no torch, no numpy: client mode stays light).

Times are seconds of one monotonic clock (time.perf_counter). TTFT is the first chunk that carries output (the
gateway's role-only first chunk does not count); ITL is the gap between consecutive output chunks (a chunk may carry
more than one token, as in vLLM's benchmark); e2e runs from sending the request to its last byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 95, 99)


@dataclass
class RequestRecord:
    start: float  # when the request was sent (in process: admitted into the batch)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying output
    end: float | None = None
    output_tokens: int = 0  # from the server's usage when it sends one, else one per output chunk
    prompt_tokens: int = 0  # as the server counted them (0: unknown)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution_ms(seconds: list[float]) -> dict[str, float | None]:
    """{mean, p50, p95, p99} in milliseconds; all None when there is no sample."""
    if not seconds:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    values = sorted(s * 1000 for s in seconds)
    out = {"mean": sum(values) / len(values)}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return {k: round(v, 3) for k, v in out.items()}


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """The benchmark's figures over every request sent; throughput is over the whole run's wall time."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    tokens = sum(r.output_tokens for r in done)
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error or "unfinished"] = errors.get(r.error or "unfinished", 0) + 1
    return {
        "completed": len(done),
        "failed": len(failed),
        "duration_s": round(duration_s, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / duration_s, 3),
        "requests_per_s": round(len(done) / duration_s, 3),
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in done) / len(done), 1) if done else None,
        "output_tokens_mean": round(tokens / len(done), 1) if done else None,
        "ttft_ms": distribution_ms([t for r in done if (t := r.ttft()) is not None]),
        "itl_ms": distribution_ms([x for r in done for x in r.itls()]),
        "e2e_ms": distribution_ms([r.end - r.start for r in done]),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),  # the most frequent few
    }
