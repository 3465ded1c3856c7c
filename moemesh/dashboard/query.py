"""PromQL's few functions the dashboard needs (rate, increase, sum by, histogram_quantile), over two scrapes.

A Snapshot is everything the mesh's /metrics endpoints said at one moment; each sample carries a `job` label (the
service it came from, as in Prometheus). Counters are monotonic per series; a restarted service starts again from 0,
so a drop is read as a reset (the new value is the increase), as Prometheus does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable identity of a series


def labels_key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


@dataclass
class Snapshot:
    t: float  # Unix seconds of the scrape
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)  # sample name -> series -> value
    up: dict[str, bool] = field(default_factory=dict)  # job -> its /metrics answered
    aliases: dict[str, str] = field(default_factory=dict)  # address -> service name (shard labels are addresses)

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        self.samples.setdefault(name, {})[labels_key(labels)] = value


def _matches(labels: Labels, match: dict[str, str | Iterable[str]], exclude: dict[str, str]) -> bool:
    d = dict(labels)
    for k, want in match.items():
        if (d.get(k) != want) if isinstance(want, str) else (d.get(k) not in want):
            return False
    return all(d.get(k) != v for k, v in exclude.items())


def select(snap: Snapshot, name: str, match: dict | None = None, exclude: dict | None = None) -> dict[Labels, float]:
    return {k: v for k, v in snap.samples.get(name, {}).items() if _matches(k, match or {}, exclude or {})}


def sum_by(series: dict[Labels, float], by: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    """sum by (by) (series); the key is the tuple of the `by` label values ("" where absent); () sums everything."""
    out: dict[tuple[str, ...], float] = {}
    for labels, value in series.items():
        d = dict(labels)
        key = tuple(d.get(b, "") for b in by)
        out[key] = out.get(key, 0.0) + value
    return out


def increase(old: Snapshot, new: Snapshot, name: str, by: tuple[str, ...] = (), match: dict | None = None,
             exclude: dict | None = None) -> dict[tuple[str, ...], float]:
    """sum by (by) (increase(name[new.t - old.t])): a series absent before counts from 0 (it was created since)."""
    before = select(old, name, match, exclude)
    deltas = {}
    for labels, value in select(new, name, match, exclude).items():
        prev = before.get(labels, 0.0)
        deltas[labels] = value - prev if value >= prev else value  # a drop: the process restarted
    return sum_by(deltas, by)


def rate(old: Snapshot, new: Snapshot, name: str, by: tuple[str, ...] = (), match: dict | None = None,
         exclude: dict | None = None) -> dict[tuple[str, ...], float]:
    seconds = new.t - old.t
    if seconds <= 0:
        return {}
    return {k: v / seconds for k, v in increase(old, new, name, by, match, exclude).items()}


def total(values: dict[tuple[str, ...], float]) -> float:
    return sum(values.values())


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {le: count}: linear interpolation inside the
    bucket holding the q-th observation; the +Inf bucket answers with the highest finite bound. None: no data."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    count = buckets[bounds[-1]]
    if count <= 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower
            inside = buckets[le] - below
            return le if inside <= 0 else lower + (le - lower) * (rank - below) / inside
        lower, below = le, buckets[le]
    return lower


def quantiles(old: Snapshot, new: Snapshot, histogram: str, qs: Iterable[float],
              match: dict | None = None) -> dict[float, float | None]:
    """histogram_quantile(q, sum by (le) (increase(<histogram>_bucket[window]))) for each q."""
    per_le = increase(old, new, f"{histogram}_bucket", ("le",), match)
    buckets = {float(le[0]): v for le, v in per_le.items()}
    return {q: histogram_quantile(q, buckets) for q in qs}


def mean(old: Snapshot, new: Snapshot, histogram: str, match: dict | None = None) -> float | None:
    """increase(_sum) / increase(_count): the mean observation over the window; None when nothing was observed."""
    n = total(increase(old, new, f"{histogram}_count", (), match))
    return total(increase(old, new, f"{histogram}_sum", (), match)) / n if n > 0 else None


def gauge(snap: Snapshot, name: str, match: dict | None = None) -> float | None:
    """sum(name) now; None when no service exports it (not zero: the chart shows a gap, not a false 0)."""
    series = select(snap, name, match)
    return sum(series.values()) if series else None
