"""The text screen of `moemesh top`: tier-1 numbers of the last window and each tenant's spend, like htop's header and
process list. Plain function of the dashboard's point and totals (no terminal, no sockets), so it is tested as text."""

from __future__ import annotations

import time


def _num(v: float | None, fmt: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{unit}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f} ms"


def _bar(share: float | None, width: int = 20) -> str:
    if share is None:
        return " " * (width + 2)
    filled = round(min(1.0, max(0.0, share)) * width)
    return "[" + "|" * filled + " " * (width - filled) + "]"


def _health(p: dict) -> list[str]:
    errors = ", ".join(f"{code} {rate:.2f}/s" for code, rate in sorted(p["errors"].items())) or "none"
    lines = [f"QPS {p['qps']:6.2f}   errors {100 * p['error_rate']:5.1f}% ({errors})",
             f"{'':14}{'p50':>10}{'p95':>10}{'p99':>10}"]
    for label, key in (("TTFT", "ttft"), ("inter-token", "itl"), ("end-to-end", "e2e")):
        q = p[key]
        lines.append(f"{label:14}{_ms(q['p50']):>10}{_ms(q['p95']):>10}{_ms(q['p99']):>10}")
    tps = p["tokens_per_s"]
    lines.append(f"tokens/s      prompt {tps['prompt']:8.1f}   generated {tps['generated']:8.1f}")
    lines.append(f"batch         mean {_num(p['batch_size'], '.1f')}   running {_num(p['running'], '.0f')}   "
                 f"queued {_num(p['queue_depth'], '.0f')}")
    kv, busy = p["kv_cache"], p.get("router_busy")
    lines.append(f"KV cache      {_bar(kv)} {_num(None if kv is None else 100 * kv, '.0f', '%')}")
    lines.append(f"router busy   {_bar(busy)} {_num(None if busy is None else 100 * busy, '.0f', '%')}")
    return lines


def _tenants(rows: list[dict]) -> list[str]:
    head = f"{'TENANT':16}{'REQS':>7}{'TOKENS':>9}{'PRICE $':>11}{'COST $':>11}{'MARGIN':>8}  MONTH / BUDGET"
    lines = [head]
    for r in sorted(rows, key=lambda r: -r["price_usd"]):
        budget = r.get("budget_usd")
        share = r["month_spent_usd"] / budget if budget and r.get("month_spent_usd") is not None else None
        month = f"${_num(r.get('month_spent_usd'), '.4f')} / " + (f"${budget:.2f} {_bar(share, 10)}" if budget
                                                                    else "unlimited")
        lines.append(f"{r['tenant'][:15]:16}{sum(r['finish'].values()):7.0f}{r['tokens']:9.0f}"
                     f"{r['price_usd']:11.5f}{r['cost_usd']:11.5f}{_num(r['margin_pct'], '.0f', '%'):>8}  {month}")
    return lines


def render(point: dict | None, totals: dict, title: str = "") -> str:
    """One screen: a header, tier 1 of `point` (None before the second scrape), and the tenants' spend."""
    up = totals.get("up", {})
    down = sorted(job for job, ok in up.items() if not ok)
    header = (f"moemesh top  {title}  {time.strftime('%H:%M:%S')}   services up {sum(up.values())}/{len(up)}"
              + (f"   DOWN: {', '.join(down)}" if down else ""))
    body = _health(point) if point is not None else ["collecting: rates need two scrapes…"]
    return "\n".join([header, "", *body, "", *_tenants(totals.get("tenants", []))]) + "\n"
