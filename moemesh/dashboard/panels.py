"""The three tiers of numbers, computed from two scrapes (a point on the live charts) or one (running totals).

Tier 1, service health: gateway QPS and errors by code, TTFT / inter-token / end-to-end latency quantiles, tokens
per second, batch size, queue depth, KV-cache use (gateway and batcher metrics). Tier 2, business quality, per tenant:
requests by finish_reason, task completion and satisfaction from feedback (metering). Tier 3, cost: price, cost of
goods and margin per tenant and per million tokens (metering), router busy fraction and CPU per service (process
metrics), the expert heat map and shard balance (router). Each number names its metric in README "Monitoring".
"""

from __future__ import annotations

from moemesh.dashboard.query import Snapshot, gauge, mean, quantiles, rate, select, sum_by, total

QS = (0.5, 0.95, 0.99)
CHAT = {"job": "gateway",  # the Chat API's completions; not health checks, feedback or usage calls
        "method": ("/moemesh.v1.Chat/CreateChatCompletion", "/moemesh.v1.Chat/StreamChatCompletion")}
B = "moemesh_batcher_"
M = "moemesh_metering_"


def _latency(old: Snapshot, new: Snapshot, histogram: str) -> dict[str, float | None]:
    return {f"p{round(q * 100)}": v for q, v in quantiles(old, new, histogram, QS).items()}


def _named(values: dict[tuple[str, ...], float]) -> dict[str, float]:
    return {k[0]: v for k, v in sorted(values.items())}


def health(old: Snapshot, new: Snapshot) -> dict:
    """Tier 1 over the window old..new."""
    handled = rate(old, new, "moemesh_rpc_server_handled_total", ("code",), CHAT)
    qps = total(handled)
    errors = {code: v for (code,), v in handled.items() if code != "OK"}
    return {
        "qps": qps, "errors": errors, "error_rate": total(errors) / qps if qps > 0 else 0.0,
        "ttft": _latency(old, new, f"{B}time_to_first_token_seconds"),
        "itl": _latency(old, new, f"{B}inter_token_latency_seconds"),
        "e2e": _latency(old, new, f"{B}e2e_request_latency_seconds"),
        "tokens_per_s": {"prompt": total(rate(old, new, f"{B}prompt_tokens_total")),
                         "generated": total(rate(old, new, f"{B}generation_tokens_total"))},
        "batch_size": mean(old, new, f"{B}batch_size"),
        "running": gauge(new, f"{B}num_requests_running"),
        "queue_depth": gauge(new, f"{B}num_requests_waiting"),
        "kv_cache": gauge(new, f"{B}kv_cache_usage_perc"),
    }


def usage_rates(old: Snapshot, new: Snapshot) -> dict:
    """Tier 2 and 3 over the window: finish reasons per second, dollars per hour (price and cost of goods), router
    busy fraction, CPU cores per service, Forward seconds per second per expert shard."""
    return {
        "finish_rate": _named(rate(old, new, f"{M}requests_total", ("finish_reason",))),
        "price_usd_h": 3600 * total(rate(old, new, f"{M}charged_usd_total")),
        "cost_usd_h": 3600 * total(rate(old, new, f"{M}cost_of_goods_usd_total")),
        "router_busy": gauge(new, f"{B}router_busy_fraction"),
        "cpu": _named(rate(old, new, "process_cpu_seconds_total", ("job",))),
        # Every shard receives every token row (it runs the experts it hosts on them), so the balance shows in the
        # time each shard's Forward calls take per second of wall time, not in rows.
        "shards": {new.aliases.get(k, k): v
                   for k, v in _named(rate(old, new, "moemesh_router_expert_step_seconds_sum", ("shard",))).items()},
        "per_mtok": _per_mtok(old, new),
    }


def _per_mtok(old: Snapshot, new: Snapshot) -> dict[str, float | None]:
    """Dollars per million tokens over the window, charged and cost of goods (prompt + completion tokens)."""
    tokens = total(rate(old, new, f"{M}tokens_total", match={"kind": ("prompt", "completion")}))
    if tokens <= 0:
        return {"price": None, "cost": None}
    return {"price": 1e6 * total(rate(old, new, f"{M}charged_usd_total")) / tokens,
            "cost": 1e6 * total(rate(old, new, f"{M}cost_of_goods_usd_total")) / tokens}


def quality(snap: Snapshot) -> dict:
    """Tier 2 per tenant, running: mean rating (1-5) and task completion rate (share of "yes" answers)."""
    rating_sum, rating_n = _per_tenant(snap, f"{M}rating_sum"), _per_tenant(snap, f"{M}rating_count")
    feedback = _per_tenant(snap, f"{M}feedback_total", ("completed",))
    answered = {t: feedback.get((t, "yes"), 0.0) + feedback.get((t, "no"), 0.0) for (t, _) in feedback}
    return {"satisfaction": {t: rating_sum.get((t,), 0.0) / n for (t,), n in sorted(rating_n.items()) if n},
            "completion": {t: feedback.get((t, "yes"), 0.0) / n for t, n in sorted(answered.items()) if n}}


def _per_tenant(snap: Snapshot, name: str, by: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    return sum_by(select(snap, name), ("tenant", *by))


def tenant_table(snap: Snapshot, accounts: dict[str, dict]) -> list[dict]:
    """Per tenant since metering started: requests by finish_reason, tokens, price, cost, margin (also per million
    tokens), satisfaction (mean rating), task completion rate, quota rejections; month spend and budget from
    metering's tenant records (`accounts`, from ListTenants)."""
    finish = _per_tenant(snap, f"{M}requests_total", ("finish_reason",))
    tokens = _per_tenant(snap, f"{M}tokens_total", ("kind",))
    price, cost = _per_tenant(snap, f"{M}charged_usd_total"), _per_tenant(snap, f"{M}cost_of_goods_usd_total")
    feedback = _per_tenant(snap, f"{M}feedback_total", ("completed",))
    rating_sum, rating_n = _per_tenant(snap, f"{M}rating_sum"), _per_tenant(snap, f"{M}rating_count")
    rejected = _per_tenant(snap, f"{M}quota_rejections_total")
    names = sorted({k[0] for k in finish} | {k[0] for k in rejected} | set(accounts))
    rows = []
    for t in names:
        tok = sum(v for k, v in tokens.items() if k[0] == t and k[1] in ("prompt", "completion"))
        p, c = price.get((t,), 0.0), cost.get((t,), 0.0)
        yes, no = feedback.get((t, "yes"), 0.0), feedback.get((t, "no"), 0.0)
        n = rating_n.get((t,), 0.0)
        account = accounts.get(t, {})
        rows.append({
            "tenant": t, "finish": {k[1]: v for k, v in finish.items() if k[0] == t},
            "tokens": tok, "price_usd": p, "cost_usd": c, "margin_usd": p - c,
            "margin_pct": 100 * (p - c) / p if p > 0 else None,
            "price_per_mtok": 1e6 * p / tok if tok else None, "cost_per_mtok": 1e6 * c / tok if tok else None,
            "satisfaction": rating_sum.get((t,), 0.0) / n if n else None,
            "task_completion": yes / (yes + no) if yes + no else None,
            "quota_rejections": rejected.get((t,), 0.0),
            "month_spent_usd": account.get("month_spent_usd"), "budget_usd": account.get("budget_usd"),
        })
    return rows


def expert_heat(snap: Snapshot) -> dict:
    """Tokens routed to each expert of each MoE layer since the router started: rows = layers, columns = experts,
    and each layer's imbalance (busiest expert / mean; 1.0 is perfectly even)."""
    counts = sum_by(select(snap, "moemesh_expert_tokens_total"), ("layer", "expert"))
    layers = sorted({int(layer) for layer, _ in counts})
    experts = 1 + max((int(e) for _, e in counts), default=-1)
    grid = [[counts.get((str(layer), str(e)), 0.0) for e in range(experts)] for layer in layers]
    imbalance = [max(row) / (sum(row) / len(row)) if row and sum(row) > 0 else None for row in grid]
    return {"layers": layers, "experts": experts, "tokens": grid, "imbalance": imbalance}


def point(old: Snapshot, new: Snapshot) -> dict:
    """One point of every live chart at new.t."""
    return {"t": new.t, **health(old, new), **usage_rates(old, new), **quality(new)}

