"""Prefix-cache hit figures per tenant (Prometheus counters and Router.Info), and which tenant each sequence runs for:
the batcher names the tenant once, when a sequence starts, like its sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

from moemesh.runtime.types import SequenceResult, SequenceWork
from services.router import metrics


@dataclass
class TenantHits:
    prompt_tokens: int = 0  # prefill tokens the cache was asked about
    cached_tokens: int = 0  # of those, served from it


class PrefixStats:
    def __init__(self) -> None:
        self.tenants: dict[str, TenantHits] = {}
        self._tenant_of: dict[str, str] = {}
        self._evicted = 0

    def started(self, works: list[SequenceWork], tenants: dict[str, str]) -> None:
        """Before a step: remember the tenant of the sequences it starts (tenants: seq_id -> tenant of works that
        named one)."""
        for w in works:
            if w.position == 0:
                self._tenant_of[w.seq_id] = tenants.get(w.seq_id, "")

    def observe(self, works: list[SequenceWork], results: list[SequenceResult]) -> None:
        """After a successful step: count the prefill work (not single decode tokens) and its hits."""
        for w, r in zip(works, results):
            if len(w.token_ids) == 1 and w.position > 0 and w.sample:
                continue  # a decode token: the cache is never asked
            tenant = self._tenant_of.get(w.seq_id, "")
            hits = self.tenants.setdefault(tenant, TenantHits())
            hits.prompt_tokens += len(w.token_ids)
            hits.cached_tokens += r.cached_tokens
            metrics.PREFIX_PROMPT_TOKENS.labels(tenant).inc(len(w.token_ids))
            if r.cached_tokens:
                metrics.PREFIX_CACHED_TOKENS.labels(tenant).inc(r.cached_tokens)

    def forget(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self._tenant_of.pop(seq_id, None)

    def gauges(self, cached_blocks: int, evicted_total: int) -> None:
        metrics.KV_BLOCKS_CACHED.set(cached_blocks)
        if evicted_total > self._evicted:
            metrics.KV_BLOCKS_EVICTED.inc(evicted_total - self._evicted)
            self._evicted = evicted_total
