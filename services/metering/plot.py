"""The usage chart of `moemesh usage --plot out.png`: tokens per hour (prompt and completion, stacked) above price
charged and cost of goods per hour, drawn with png.Canvas (no matplotlib). Periods longer than 14 days are drawn per
day instead of per hour; buckets without traffic are drawn empty, so the x axis is linear in time.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from services.metering.png import Canvas, Color
from services.metering.report import Report, Totals

W, H = 1000, 700
LEFT, RIGHT, TOP = 110, 30, 70
PROMPT, COMPLETION = (66, 133, 244), (251, 140, 0)
PRICE, COST = (52, 168, 83), (219, 68, 55)
GRID, AXIS, INK = (225, 225, 225), (90, 90, 90), (30, 30, 30)


def _nice_step(top: float, ticks: int = 5) -> float:
    raw = max(top, 1e-12) / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _fmt(v: float, dollars: bool, step: float) -> str:
    if dollars:
        decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
        return f"${v:.{min(decimals, 8)}f}"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _buckets(report: Report) -> tuple[int, list[tuple[int, Totals]]]:
    """(bucket seconds, [(bucket start, totals)]) covering first..last bucket contiguously."""
    if not report.by_hour:
        return 3600, []
    hours = sorted(report.by_hour)
    size = 3600 if hours[-1] - hours[0] <= 14 * 86400 else 86400
    merged: dict[int, Totals] = {}
    for h in hours:
        t, src = merged.setdefault(h - h % size, Totals()), report.by_hour[h]
        for name in ("requests", "prompt_tokens", "completion_tokens", "price_nano", "cost_pico"):
            setattr(t, name, getattr(t, name) + getattr(src, name))
    first, last = min(merged), max(merged)
    return size, [(b, merged.get(b, Totals())) for b in range(first, last + size, size)]


def _panel(c: Canvas, top: int, bottom: int, title: str, series: list[list[float]], colors: list[Color],
           stacked: bool, dollars: bool) -> None:
    """One bar chart: series[k][i] is bucket i of series k; stacked bars or side-by-side bars."""
    c.text(LEFT, top - 26, title, INK)
    n = len(series[0])
    peak = max((sum(col) if stacked else max(col)) for col in zip(*series)) if n else 0.0
    step = _nice_step(peak or 1.0)
    ymax = step * math.ceil((peak or 1.0) / step)
    height = bottom - top

    def y_of(v: float) -> int:
        return bottom - round(v / ymax * height)

    for k in range(round(ymax / step) + 1):
        v = k * step
        c.line(LEFT, y_of(v), W - RIGHT, y_of(v), GRID)
        label = _fmt(v, dollars, step)
        c.text(LEFT - 8 - Canvas.text_width(label), y_of(v) - 7, label, AXIS)
    slot = (W - RIGHT - LEFT) / max(n, 1)
    bar = max(1.0, slot * 0.8) / (1 if stacked else len(series))
    for i in range(n):
        x = LEFT + i * slot + slot * 0.1
        base = 0.0
        for k, s in enumerate(series):
            x0 = round(x + (0 if stacked else k * bar))
            lo = base if stacked else 0.0
            c.fill_rect(x0, y_of(lo + s[i]), max(x0 + 1, round(x0 + bar)), y_of(lo), colors[k])
            base += s[i] if stacked else 0.0
    c.line(LEFT, bottom, W - RIGHT, bottom, AXIS, 2)
    c.line(LEFT, top, LEFT, bottom, AXIS, 2)


def _legend(c: Canvas, x: int, y: int, items: list[tuple[str, Color]]) -> None:
    for label, color in items:
        c.fill_rect(x, y, x + 14, y + 14, color)
        c.text(x + 20, y, label, INK)
        x += 20 + Canvas.text_width(label) + 30


def _time_labels(c: Canvas, buckets: list[int], size: int, y: int) -> None:
    n = len(buckets)
    slot = (W - RIGHT - LEFT) / max(n, 1)
    fmt = "%m-%d %H:00" if size == 3600 else "%Y-%m-%d"
    every = max(1, math.ceil(n / ((W - LEFT - RIGHT) // (Canvas.text_width("00-00 00:00") + 20))))
    for i in range(0, n, every):
        label = datetime.fromtimestamp(buckets[i], timezone.utc).strftime(fmt)
        x = round(LEFT + i * slot + slot / 2 - Canvas.text_width(label) / 2)
        c.line(round(LEFT + i * slot + slot / 2), y - 10, round(LEFT + i * slot + slot / 2), y - 4, AXIS)
        c.text(max(0, x), y, label, AXIS)


def draw_usage_png(report: Report, path: str | Path) -> int:
    """Writes the chart; returns the number of buckets drawn (0: an empty chart saying so)."""
    c = Canvas(W, H)
    size, buckets = _buckets(report)
    unit = "HOUR" if size == 3600 else "DAY"
    c.text(LEFT, 16, f"TENANT {report.tenant}: TOKENS AND DOLLARS PER {unit} (UTC)", INK, 2)
    if not buckets:
        c.text(LEFT, H // 2, "NO REQUESTS IN THIS PERIOD", INK, 3)
        c.save(path)
        return 0
    starts = [b for b, _ in buckets]
    tokens = [[t.prompt_tokens for _, t in buckets], [t.completion_tokens for _, t in buckets]]
    money = [[t.price_nano / 1e9 for _, t in buckets], [t.cost_pico / 1e12 for _, t in buckets]]
    _panel(c, TOP + 20, 320, "TOKENS", tokens, [PROMPT, COMPLETION], stacked=True, dollars=False)
    _legend(c, W - RIGHT - 370, TOP - 6, [("PROMPT", PROMPT), ("COMPLETION", COMPLETION)])
    _time_labels(c, starts, size, 330)
    _panel(c, 400, 640, "DOLLARS", money, [PRICE, COST], stacked=False, dollars=True)
    _legend(c, W - RIGHT - 420, 374, [("PRICE CHARGED", PRICE), ("COST OF GOODS", COST)])
    _time_labels(c, starts, size, 650)
    c.save(path)
    return len(buckets)
