"""The dashboard's panels as PromQL, for Grafana over a real Prometheus (deploy/observability/): the same three tiers
the built-in dashboard computes itself (moemesh/dashboard/panels.py). Targets come from the dashboard's /sd with a
`service` label (the scrape keeps the metrics' own labels: honor_labels)."""

from __future__ import annotations

from dataclasses import dataclass

CHAT = 'service="gateway",method=~"/moemesh.v1.Chat/(Create|Stream)ChatCompletion"'
B, M = "moemesh_batcher_", "moemesh_metering_"


@dataclass(frozen=True)
class Panel:
    tier: int
    title: str
    unit: str  # Grafana unit id
    queries: tuple[tuple[str, str], ...]  # (legend, PromQL)
    kind: str = "timeseries"  # or "table" (instant queries), "heatmap"


def _q3(histogram: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"p{q}", f"histogram_quantile(0.{q}, sum by (le) (rate({histogram}_bucket[1m])))")
                 for q in ("50", "95", "99"))


PANELS = (
    Panel(1, "Requests per second", "reqps", (("chat", f"sum(rate(moemesh_rpc_server_handled_total{{{CHAT}}}[1m]))"),)),
    Panel(1, "Error rate by gRPC code", "percentunit", ((
        "{{code}}", f'sum by (code) (rate(moemesh_rpc_server_handled_total{{{CHAT},code!="OK"}}[1m])) / scalar('
                    f"sum(rate(moemesh_rpc_server_handled_total{{{CHAT}}}[1m])))"),)),
    Panel(1, "Time to first token", "s", _q3(f"{B}time_to_first_token_seconds")),
    Panel(1, "Inter-token latency", "s", _q3(f"{B}inter_token_latency_seconds")),
    Panel(1, "End-to-end latency", "s", _q3(f"{B}e2e_request_latency_seconds")),
    Panel(1, "Tokens per second", "short", (("prompt", f"sum(rate({B}prompt_tokens_total[1m]))"),
                                            ("generated", f"sum(rate({B}generation_tokens_total[1m]))"))),
    Panel(1, "Batch size and queue depth", "short", (
        ("mean batch", f"sum(rate({B}batch_size_sum[1m])) / sum(rate({B}batch_size_count[1m]))"),
        ("running", f"sum({B}num_requests_running)"), ("queued", f"sum({B}num_requests_waiting)"))),
    Panel(1, "KV-cache use", "percentunit", (("KV blocks used", f"max({B}kv_cache_usage_perc)"),)),
    Panel(2, "Requests finished by finish_reason", "reqps", (
        ("{{finish_reason}}", f"sum by (finish_reason) (rate({M}requests_total[5m]))"),)),
    Panel(2, "Finish reasons per tenant (last hour)", "short", (
        ("", f"sum by (tenant, finish_reason) (increase({M}requests_total[1h]))"),), "table"),
    Panel(2, "Satisfaction per tenant (mean rating 1-5)", "short", (
        ("{{tenant}}", f"sum by (tenant) ({M}rating_sum) / sum by (tenant) ({M}rating_count)"),)),
    Panel(2, "Task completion per tenant", "percentunit", (
        ("{{tenant}}", f'sum by (tenant) ({M}feedback_total{{completed="yes"}}) / '
                       f'sum by (tenant) ({M}feedback_total{{completed=~"yes|no"}})'),)),
    Panel(3, "Price vs cost of goods per tenant", "currencyUSD", (
        ("price {{tenant}}", f"3600 * sum by (tenant) (rate({M}charged_usd_total[5m]))"),
        ("cost {{tenant}}", f"3600 * sum by (tenant) (rate({M}cost_of_goods_usd_total[5m]))"))),
    Panel(3, "Margin per tenant", "percentunit", (
        ("{{tenant}}", f"1 - sum by (tenant) ({M}cost_of_goods_usd_total) / sum by (tenant) ({M}charged_usd_total)"),)),
    Panel(3, "Price and cost per million tokens", "currencyUSD", tuple(
        (f"{name} {{{{tenant}}}}", f"1e6 * sum by (tenant) (rate({M}{metric}[5m])) / "
                                   f'sum by (tenant) (rate({M}tokens_total{{kind=~"prompt|completion"}}[5m]))')
        for name, metric in (("price", "charged_usd_total"), ("cost", "cost_of_goods_usd_total")))),
    Panel(3, "Month spent / budget", "percentunit", (
        ("{{tenant}}", "moemesh_tenant_month_spent_usd / (moemesh_tenant_budget_usd > 0)"),)),
    Panel(3, "Router busy and CPU per service", "short", (
        ("router busy", f"max({B}router_busy_fraction)"),
        ("{{service}} CPU cores", "sum by (service) (rate(process_cpu_seconds_total[1m]))"))),
    Panel(3, "Shard balance: Forward time per shard", "percentunit", (
        ("{{shard}}", "sum by (shard) (rate(moemesh_router_expert_step_seconds_sum[1m]))"),)),
    Panel(3, "Expert heat map (tokens per expert, last 5 min)", "short", (
        ("layer {{layer}} expert {{expert}}", "sum by (layer, expert) (increase(moemesh_expert_tokens_total[5m]))"),),
        "table"),
    Panel(3, "Services up", "short", (("{{service}}", "up"),), "table"),
)
