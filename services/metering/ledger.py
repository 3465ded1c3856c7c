"""The usage ledger: one record per committed request in the tenant's Redis stream `mm:{tenant}:ledger`.

Stream ids are the commit time in ms (from the metering clock), so a period is one XRANGE. Records are appended only
by the commit script, which skips a request id already committed: retries never double-count. The stream is never
trimmed: it is the record of what was charged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from services.metering.keys import TenantKeys
from services.metering.pricing import usd, usd_pico

# Stream field names (short: the ledger is the largest thing in Redis).
_FIELDS = {
    "request_id": "rid", "key_id": "key", "model": "model", "user": "user", "prompt_tokens": "pt",
    "completion_tokens": "ct", "cached_tokens": "cached", "latency_s": "lat", "finish_reason": "fin",
    "engine_s": "eng", "hardware": "hw", "devices": "dev", "price_nano": "price", "cost_pico": "cost", "at_ms": "at",
}
_INTS = {"prompt_tokens", "completion_tokens", "cached_tokens", "devices", "price_nano", "cost_pico", "at_ms"}
_FLOATS = {"latency_s", "engine_s"}


@dataclass(frozen=True)
class Usage:
    """What the gateway reports when a request ends (CommitRequest)."""

    request_id: str
    tenant: str
    key_id: str = ""
    model: str = ""
    user: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str = ""
    engine_s: float = 0.0  # the request's share of batch-shared engine time
    hardware: str = ""  # "<device>:<class>" of the engine; "" = metering's default
    devices: int = 0  # GPUs (or CPU cores) the engine used; 0 = metering's default


@dataclass(frozen=True)
class UsageRecord(Usage):
    """A ledger entry: the usage plus what was charged (n$) and what it cost (p$)."""

    price_nano: int = 0
    cost_pico: int = 0
    at_ms: int = 0
    ledger_id: str = ""

    @property
    def price_usd(self) -> float:
        return usd(self.price_nano)

    @property
    def cost_usd(self) -> float:
        return usd_pico(self.cost_pico)

    @property
    def margin_usd(self) -> float:
        return usd_pico(self.price_nano * 1000 - self.cost_pico)

    def stream_fields(self) -> list[str]:
        """Flat field/value list for XADD."""
        out: list[str] = []
        for name, short in _FIELDS.items():
            value = getattr(self, name)
            out += [short, repr(value) if isinstance(value, float) else str(value)]
        return out

    @classmethod
    def from_stream(cls, tenant: str, ledger_id: str, fields: dict[str, str]) -> "UsageRecord":
        values: dict = {"tenant": tenant, "ledger_id": ledger_id}
        for name, short in _FIELDS.items():
            raw = fields.get(short, "")
            values[name] = int(raw or 0) if name in _INTS else float(raw or 0) if name in _FLOATS else raw
        return cls(**values)

    def as_row(self) -> dict:
        """Flat dict for CSV/JSON export (dollars as floats)."""
        row = asdict(self)
        row.pop("price_nano")
        row.pop("cost_pico")
        row.update(at_unix=self.at_ms / 1000.0, price_usd=self.price_usd, cost_usd=self.cost_usd,
                   margin_usd=self.margin_usd)
        return row


async def read_ledger(redis: aioredis.Redis, tenant: str, since_s: float = 0, until_s: float | None = None,
                      page: int = 1000) -> AsyncIterator[UsageRecord]:
    """Records of `tenant` committed in [since_s, until_s) (until None: no end), oldest first, paged."""
    key = TenantKeys(tenant).ledger
    start = str(max(0, int(since_s * 1000)))
    end = "+" if until_s is None else f"{int(until_s * 1000) - 1}"  # "<ms>" as an end covers every seq of that ms
    if end != "+" and int(end) < int(start):
        return
    while True:
        entries = await redis.xrange(key, min=start, max=end, count=page)
        for ledger_id, fields in entries:
            yield UsageRecord.from_stream(tenant, ledger_id, fields)
        if len(entries) < page:
            return
        start = "(" + entries[-1][0]  # exclusive start (Redis >= 6.2)
