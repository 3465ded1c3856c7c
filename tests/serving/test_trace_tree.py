"""`moemesh trace`: span files -> one request's tree, with folding of long sibling runs."""

from __future__ import annotations

import json
from pathlib import Path

from moemesh.cli.trace import load_spans, recent_requests, render, spans_of_request
from moemesh.serving.telemetry import _traced


def _span(span_id, parent, name, service, start, end, trace="t1", **attrs):
    return {"trace_id": trace, "span_id": span_id, "parent_id": parent, "name": name, "service": service,
            "kind": "SERVER", "start": start * 1_000_000, "end": end * 1_000_000, "status": "UNSET",
            "attributes": attrs}


def test_tree_of_one_request_across_files(tmp_path: Path) -> None:
    gateway = [_span("a", None, "/Chat/Create", "gateway", 0, 100, **{"moemesh.request_id": "chatcmpl-1"}),
               _span("z", None, "/Chat/Create", "gateway", 0, 5, trace="t2", **{"moemesh.request_id": "chatcmpl-2"})]
    batcher = [_span(f"s{i}", "a", "batcher.step", "batcher", 10 + i, 11 + i, **{"moemesh.step_id": i})
               for i in range(10)]
    (tmp_path / "gateway.jsonl").write_text("".join(json.dumps(s) + "\n" for s in gateway))
    (tmp_path / "batcher.jsonl").write_text("".join(json.dumps(s) + "\n" for s in batcher) + '{"partial')
    spans = load_spans(tmp_path)
    mine = spans_of_request(spans, "chatcmpl-1")
    assert len(mine) == 11 and {s["trace_id"] for s in mine} == {"t1"}
    folded = render(mine)
    assert folded[0].split()[-1] == "/Chat/Create"
    assert sum("batcher.step" in line and "more" not in line for line in folded) == 3
    assert "... 7 more batcher.step (7.0 ms in all" in "\n".join(folded)
    assert len(render(mine, fold=False)) == 11
    assert [rid for rid, _ in recent_requests(spans, 5)] == ["chatcmpl-1", "chatcmpl-2"]


def test_untraced_methods_and_health_make_no_spans() -> None:
    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    assert _traced(Details("/moemesh.v1.Router/Step"))
    assert not _traced(Details("/moemesh.v1.Expert/Forward"))
    assert not _traced(Details("/grpc.health.v1.Health/Check"))
    assert not _traced(Details("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"))
