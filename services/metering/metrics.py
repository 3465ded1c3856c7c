"""Prometheus metrics of metering (moemesh_metering_*), per tenant: what was used, charged and what it cost us, quota
rejections, and the quality signals. Each replica counts what it handled; Prometheus sums over replicas.
Mean satisfaction = rating_sum / rating_count; task completion rate = feedback{completed="yes"} / feedback."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from moemesh.serving.metrics import NAMESPACE

_SUB = "metering"

TOKENS = Counter("tokens", "Tokens committed, by kind (prompt, completion, cached).", ["tenant", "model", "kind"],
                 namespace=NAMESPACE, subsystem=_SUB)
REQUESTS = Counter("requests", "Requests committed, by finish reason.", ["tenant", "model", "finish_reason"],
                   namespace=NAMESPACE, subsystem=_SUB)
CHARGED_USD = Counter("charged_usd", "Dollars charged to tenants.", ["tenant", "model"],
                      namespace=NAMESPACE, subsystem=_SUB)
COST_USD = Counter("cost_of_goods_usd", "Cost of goods (hardware time) in dollars.", ["tenant", "model"],
                   namespace=NAMESPACE, subsystem=_SUB)
ENGINE_SECONDS = Counter("engine_seconds", "Engine seconds attributed to requests.", ["tenant", "model"],
                         namespace=NAMESPACE, subsystem=_SUB)
QUOTA_REJECTIONS = Counter("quota_rejections", "Reservations refused, by limit (rpm, tpm, concurrency, budget).",
                           ["tenant", "limit"], namespace=NAMESPACE, subsystem=_SUB)
DUPLICATE_COMMITS = Counter("duplicate_commits", "Commits of an already committed request id (not counted).",
                            ["tenant"], namespace=NAMESPACE, subsystem=_SUB)
EXPIRED = Counter("reservations_expired", "Reservations refunded by the sweeper because no commit came.",
                  namespace=NAMESPACE, subsystem=_SUB)
FEEDBACK = Counter("feedback", "Feedback answers on task completion (yes, no, unanswered).", ["tenant", "completed"],
                   namespace=NAMESPACE, subsystem=_SUB)
RATING = Histogram("rating", "Ratings (1-5) given by tenants.", ["tenant"], buckets=(1, 2, 3, 4, 5),
                   namespace=NAMESPACE, subsystem=_SUB)
