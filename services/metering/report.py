"""Usage reports of a tenant over a period: totals, per model and per hour, price beside cost of goods and margin,
with the tenant's feedback (satisfaction = mean rating, task completion = share of "completed" answers).

Reports scan the ledger stream over the period (one XRANGE page of 1,000 records at a time). Sums are integers (n$, p$)
so that a report's total equals the sum of its records exactly.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from services.metering.feedback import Feedback, FeedbackStore
from services.metering.ledger import UsageRecord, read_ledger
from services.metering.pricing import usd, usd_pico

EXPORT_COLUMNS = [
    "ledger_id", "at_unix", "request_id", "tenant", "key_id", "model", "user", "prompt_tokens", "completion_tokens",
    "cached_tokens", "latency_s", "finish_reason", "engine_s", "hardware", "devices", "price_usd", "cost_usd",
    "margin_usd", "rating", "task_completed", "comment",
]


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_s: float = 0.0
    latency_s: float = 0.0
    price_nano: int = 0
    cost_pico: int = 0
    rated: int = 0
    rating_sum: int = 0
    completion_answers: int = 0
    completed: int = 0

    def add(self, r: UsageRecord, fb: Feedback | None) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.cached_tokens += r.cached_tokens
        self.engine_s += r.engine_s
        self.latency_s += r.latency_s
        self.price_nano += r.price_nano
        self.cost_pico += r.cost_pico
        if fb is not None and fb.rating:
            self.rated += 1
            self.rating_sum += fb.rating
        if fb is not None and fb.task_completed is not None:
            self.completion_answers += 1
            self.completed += int(fb.task_completed)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_tokens": self.cached_tokens, "engine_s": self.engine_s,
            "mean_latency_s": self.latency_s / self.requests if self.requests else None,
            "price_usd": usd(self.price_nano), "cost_usd": usd_pico(self.cost_pico),
            "margin_usd": usd_pico(self.price_nano * 1000 - self.cost_pico),
            "margin_pct": 100.0 * (1 - self.cost_pico / (self.price_nano * 1000)) if self.price_nano else None,
            "rated_requests": self.rated,
            "satisfaction": self.rating_sum / self.rated if self.rated else None,
            "task_completion_rate": self.completed / self.completion_answers if self.completion_answers else None,
        }


@dataclass
class Report:
    tenant: str
    since_s: float
    until_s: float | None
    totals: Totals = field(default_factory=Totals)
    by_model: dict[str, Totals] = field(default_factory=dict)
    by_hour: dict[int, Totals] = field(default_factory=dict)  # key: Unix time of the hour's start
    rows: list[dict] = field(default_factory=list)  # filled only when asked (exports)

    def as_dict(self) -> dict:
        return {"tenant": self.tenant, "since_unix": self.since_s, "until_unix": self.until_s,
                **self.totals.as_dict(), "by_model": {m: t.as_dict() for m, t in sorted(self.by_model.items())}}


def _row(r: UsageRecord, fb: Feedback | None) -> dict:
    row = r.as_row()
    row.update(rating=fb.rating if fb and fb.rating else None,
               task_completed=fb.task_completed if fb else None, comment=fb.comment if fb else "")
    return {c: row[c] for c in EXPORT_COLUMNS}


async def build_report(redis: aioredis.Redis, tenant: str, since_s: float = 0, until_s: float | None = None,
                       *, with_rows: bool = False) -> Report:
    report = Report(tenant, since_s, until_s)
    feedback = FeedbackStore(redis)
    page: list[UsageRecord] = []

    async def flush() -> None:
        fbs = await feedback.get_many(tenant, [r.request_id for r in page])
        for r in page:
            fb = fbs.get(r.request_id)
            report.totals.add(r, fb)
            report.by_model.setdefault(r.model, Totals()).add(r, fb)
            hour = (r.at_ms // 3_600_000) * 3600
            report.by_hour.setdefault(hour, Totals()).add(r, fb)
            if with_rows:
                report.rows.append(_row(r, fb))
        page.clear()

    async for record in read_ledger(redis, tenant, since_s, until_s):
        page.append(record)
        if len(page) >= 1000:
            await flush()
    await flush()
    return report


def rows_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def rows_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
