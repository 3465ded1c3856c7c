"""PromQL's rate / increase / histogram_quantile as the dashboard computes them, against hand-checked numbers."""

from __future__ import annotations

import math

import pytest

from moemesh.dashboard.query import Snapshot, gauge, histogram_quantile, increase, mean, quantiles, rate, sum_by
from moemesh.dashboard.scrape import parse_into


def snap(t: float, text: str, job: str = "batcher") -> Snapshot:
    s = Snapshot(t)
    parse_into(s, job, text)
    return s


HIST = """# TYPE lat histogram
lat_bucket{{le="0.1"}} {a}
lat_bucket{{le="0.5"}} {b}
lat_bucket{{le="+Inf"}} {c}
lat_sum {s}
lat_count {c}
"""


def test_rate_sums_by_label_and_reads_a_drop_as_a_restart() -> None:
    old = snap(100, '# TYPE req counter\nreq_total{code="OK"} 10\nreq_total{code="UNAVAILABLE"} 4\n')
    new = snap(110, '# TYPE req counter\nreq_total{code="OK"} 30\nreq_total{code="UNAVAILABLE"} 1\n'
                    'req_total{code="INTERNAL"} 5\n')
    assert rate(old, new, "req_total", ("code",)) == {("OK",): 2.0, ("UNAVAILABLE",): 0.1, ("INTERNAL",): 0.5}
    assert increase(old, new, "req_total", (), exclude={"code": "OK"}) == {(): 6.0}
    assert rate(new, new, "req_total") == {}  # no time passed: no rate (not a division by zero)


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.1 + 0.4 * 20 / 40)
    assert histogram_quantile(0.99, buckets) == 0.5  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_quantiles_and_mean_cover_only_the_window() -> None:
    old = snap(0, HIST.format(a=100, b=100, c=100, s=5))  # 100 fast observations before the window
    new = snap(10, HIST.format(a=100, b=110, c=110, s=8))  # 10 in (0.1, 0.5] within it
    q = quantiles(old, new, "lat", (0.5, 0.99))
    assert q[0.5] == pytest.approx(0.3) and q[0.99] == pytest.approx(0.1 + 0.4 * 9.9 / 10)
    assert mean(old, new, "lat") == pytest.approx(0.3)
    assert mean(new, new, "lat") is None


def test_gauge_is_none_when_nobody_exports_it_and_sum_by_groups() -> None:
    s = snap(0, '# TYPE g gauge\ng{shard="a"} 2\ng{shard="b"} 3\n')
    assert gauge(s, "g") == 5.0 and gauge(s, "missing") is None
    assert sum_by({(("shard", "a"), ("x", "1")): 1.0, (("shard", "a"), ("x", "2")): 2.0}, ("shard",)) == {("a",): 3.0}
