"""Calendar periods in UTC: the monthly budget resets at 00:00 UTC on the 1st."""

from __future__ import annotations

from datetime import datetime, timezone


def month_of(unix_s: float) -> str:
    """'YYYY-MM' of a Unix time, UTC."""
    return datetime.fromtimestamp(unix_s, timezone.utc).strftime("%Y-%m")


def next_month_start(unix_s: float) -> float:
    """Unix time of the first instant of the next calendar month, UTC."""
    t = datetime.fromtimestamp(unix_s, timezone.utc)
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return datetime(year, month, 1, tzinfo=timezone.utc).timestamp()


def month_start(unix_s: float) -> float:
    t = datetime.fromtimestamp(unix_s, timezone.utc)
    return datetime(t.year, t.month, 1, tzinfo=timezone.utc).timestamp()
