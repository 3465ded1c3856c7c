"""`moemesh trace <request-id>`: the request's span tree with durations, from MOEMESH_HOME/traces/*.jsonl (the span
files every service writes when no OTLP endpoint is set). Without a request id: the most recent requests.

Long runs of identical sibling spans (a decode loop's batcher.step spans, say) are folded to their first and last
spans plus one summary line; --all prints every span.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

REQUEST_ID = "moemesh.request_id"
FOLD_OVER = 4  # sibling runs longer than this are folded
SHOWN_ATTRS = ("moemesh.step_id", "moemesh.tokens", "moemesh.sequences", "moemesh.layers", "moemesh.expert.calls",
               "moemesh.finish_reason", "rpc.grpc.status_code")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="print a request's span tree from the local trace files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("request_id", nargs="?", help="chatcmpl-... (omit to list recent requests)")
    p.add_argument("--traces-dir", type=Path, help="default MOEMESH_HOME/traces")
    p.add_argument("--all", action="store_true", help="do not fold repeated sibling spans")
    p.add_argument("--json", action="store_true", help="print the trace's spans as JSON lines")
    p.add_argument("--limit", type=int, default=10, help="requests to list without a request id")
    p.set_defaults(func=run)


def load_spans(traces_dir: Path) -> list[dict]:
    spans = []
    for path in sorted(traces_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    spans.append(json.loads(line))
                except ValueError:
                    continue  # a line being written right now
    return spans


def spans_of_request(spans: Iterable[dict], request_id: str) -> list[dict]:
    """Every span of the trace(s) that carry `request_id` on some span."""
    spans = list(spans)
    trace_ids = {s["trace_id"] for s in spans if s.get("attributes", {}).get(REQUEST_ID) == request_id}
    return [s for s in spans if s["trace_id"] in trace_ids]


def _ms(span: dict) -> float:
    return (span["end"] - span["start"]) / 1e6


def _label(span: dict) -> str:
    attrs = span.get("attributes", {})
    extra = " ".join(f"{k.removeprefix('moemesh.')}={attrs[k]}" for k in SHOWN_ATTRS
                     if k in attrs and not (k == "rpc.grpc.status_code" and attrs[k] == 0))
    kind = " (client)" if span.get("kind") == "CLIENT" else ""
    status = " ERROR" if span.get("status") == "ERROR" else ""
    return f"{span['name']}{kind}{status}" + (f"  [{extra}]" if extra else "")


def render(spans: list[dict], *, fold: bool = True) -> list[str]:
    """Lines of the tree: offset from the first span, duration, service, name."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        parent = s.get("parent_id")
        children[parent if parent in by_id else None].append(s)
    for group in children.values():
        group.sort(key=lambda s: s["start"])
    t0 = min(s["start"] for s in spans)
    lines: list[str] = []

    def line(span: dict, depth: int) -> None:
        lines.append(f"{(span['start'] - t0) / 1e6:>9.1f} ms {_ms(span):>9.1f} ms  "
                     f"{span['service']:<10} {'  ' * depth}{_label(span)}")

    def walk(span: dict, depth: int) -> None:
        line(span, depth)
        for run in _runs(children.get(span["span_id"], [])):
            if fold and len(run) > FOLD_OVER:
                for s in run[:2]:
                    walk(s, depth + 1)
                hidden = run[2:-1]
                lines.append(f"{'':>26}{'':<11}{'  ' * (depth + 1)}... {len(hidden)} more {run[0]['name']} "
                             f"({sum(map(_ms, hidden)):.1f} ms in all; --all shows them)")
                walk(run[-1], depth + 1)
            else:
                for s in run:
                    walk(s, depth + 1)

    for root in children[None]:
        walk(root, 0)
    return lines


def _runs(siblings: list[dict]) -> list[list[dict]]:
    """Consecutive siblings with the same service and name, grouped."""
    runs: list[list[dict]] = []
    for s in siblings:
        if runs and (runs[-1][0]["service"], runs[-1][0]["name"]) == (s["service"], s["name"]):
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def recent_requests(spans: list[dict], limit: int) -> list[tuple[str, dict]]:
    """(request id, its earliest span) of the last `limit` requests, newest last."""
    first: dict[str, dict] = {}
    for s in spans:
        rid = s.get("attributes", {}).get(REQUEST_ID)
        if rid and (rid not in first or s["start"] < first[rid]["start"]):
            first[rid] = s
    return sorted(first.items(), key=lambda kv: kv[1]["start"])[-limit:]


def run(ns: argparse.Namespace) -> int:
    from moemesh import home

    traces_dir = ns.traces_dir or home.subdir("traces")
    spans = load_spans(traces_dir)
    if not ns.request_id:
        for rid, span in recent_requests(spans, ns.limit):
            print(f"{rid}  {span['service']:<10} {span['name']}  {_ms(span):.1f} ms")
        return 0
    found = spans_of_request(spans, ns.request_id)
    if not found:
        print(f"moemesh trace: no spans of {ns.request_id!r} in {traces_dir} (spans are written ~0.2 s after they "
              f"end; with OTEL_EXPORTER_OTLP_ENDPOINT set they go to the collector instead)", file=sys.stderr)
        return 1
    if ns.json:
        for s in sorted(found, key=lambda s: s["start"]):
            print(json.dumps(s))
        return 0
    services = sorted({s["service"] for s in found})
    total = (max(s["end"] for s in found) - min(s["start"] for s in found)) / 1e6
    trace_ids = sorted({s["trace_id"] for s in found})
    print(f"trace {', '.join(trace_ids)}: request {ns.request_id}, {len(found)} spans, {total:.1f} ms, "
          f"{len(services)} services ({', '.join(services)})")
    print(f"{'start':>12} {'duration':>12}  {'service':<10} span")
    for text in render(found, fold=not ns.all):
        print(text)
    return 0
