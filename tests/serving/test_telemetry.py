"""Tracing across real gRPC hops: one trace id, parent links, the request id via baggage; the JSONL span format;
trace ids in log records."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.serving import client_channel, request_scope, serve_in_process, sync_client_channel
from moemesh.serving.logging import TraceContextFilter
from moemesh.serving.telemetry import JsonlSpanExporter, flush_tracing
from moemesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from span_capture import memory_exporter

from .echo import TOKENIZER, EchoTokenizer


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return memory_exporter("serving-tests")


class Front(tokenizer_pb2_grpc.TokenizerServicer):
    """Decode calls the back service twice: once through an aio channel, once through a sync channel's future."""

    def __init__(self, back: str) -> None:
        self.back = back

    async def Decode(self, request, context):
        with request_scope(request.model):
            channel = client_channel(self.back)
            first = await tokenizer_pb2_grpc.TokenizerStub(channel).Decode(tokenizer_pb2.DecodeRequest(ids=[1]))
            second = await asyncio.to_thread(self._sync_decode)
            await channel.close()
        return tokenizer_pb2.DecodeResponse(text=first.text + second)

    def _sync_decode(self) -> str:
        channel = sync_client_channel(self.back)
        future = tokenizer_pb2_grpc.TokenizerStub(channel).Decode.future(tokenizer_pb2.DecodeRequest(ids=[2]))
        text = future.result(timeout=10).text
        channel.close()
        return text


def _register(servicer):
    def register(server: grpc.aio.Server) -> list[str]:
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server)
        return [TOKENIZER]

    return register


async def test_one_trace_across_hops_with_request_id(spans: InMemorySpanExporter) -> None:
    spans.clear()
    async with serve_in_process(_register(EchoTokenizer()), name="back") as back:
        async with serve_in_process(_register(Front(back.address)), name="front") as front:
            channel = client_channel(front.address)
            response = await tokenizer_pb2_grpc.TokenizerStub(channel).Decode(
                tokenizer_pb2.DecodeRequest(model="chatcmpl-abc")
            )
            await channel.close()
    assert response.text == "12"
    finished = spans.get_finished_spans()
    servers = [s for s in finished if s.kind == trace.SpanKind.SERVER]
    assert len(servers) == 3  # front Decode + two back Decodes
    assert len({s.context.trace_id for s in finished}) == 1
    tagged = [s for s in servers if s.attributes.get("moemesh.request_id") == "chatcmpl-abc"]
    assert len(tagged) == 3, "the request id reaches downstream spans through baggage"
    by_id = {s.context.span_id: s for s in finished}
    for server in servers[:2]:  # the back spans: their parent is a client span of the front
        parent = by_id[server.parent.span_id]
        assert parent.kind == trace.SpanKind.CLIENT


def test_health_checks_make_no_spans(spans: InMemorySpanExporter) -> None:
    assert not [s for s in spans.get_finished_spans() if "grpc.health" in s.name]


def test_jsonl_exporter_writes_one_record_per_span(tmp_path, spans: InMemorySpanExporter) -> None:
    spans.clear()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("outer"), request_scope("chatcmpl-1"):
        with tracer.start_as_current_span("inner") as inner:
            inner.set_attribute("moemesh.layers", (1, 2))
    flush_tracing()
    exporter = JsonlSpanExporter(tmp_path / "traces" / "x.jsonl")
    exporter.export(spans.get_finished_spans())
    exporter.shutdown()
    records = [json.loads(line) for line in (tmp_path / "traces" / "x.jsonl").read_text().splitlines()]
    inner_rec, outer_rec = records
    assert inner_rec["name"] == "inner" and inner_rec["parent_id"] == outer_rec["span_id"]
    assert outer_rec["parent_id"] is None and inner_rec["trace_id"] == outer_rec["trace_id"]
    assert inner_rec["attributes"] == {"moemesh.request_id": "chatcmpl-1", "moemesh.layers": [1, 2]}
    assert outer_rec["attributes"]["moemesh.request_id"] == "chatcmpl-1"
    # The process's one tracer provider may have been set up by an earlier test module under another name.
    service = trace.get_tracer_provider().resource.attributes["service.name"]
    assert inner_rec["service"] == service and inner_rec["end"] >= inner_rec["start"] > 0


def test_log_records_carry_the_trace_id(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    TraceContextFilter("svc").filter(record)
    assert record.trace_id == "-"
    with trace.get_tracer("test").start_as_current_span("s") as span:
        TraceContextFilter("svc").filter(record)
    assert record.trace_id == f"{span.get_span_context().trace_id:032x}" and record.service == "svc"


def test_client_channel_outside_a_loop_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        client_channel("127.0.0.1:1")


def test_exporter_is_otlp_when_an_endpoint_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    from moemesh.serving.telemetry import _exporter

    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    local = _exporter("svc")
    assert isinstance(local, JsonlSpanExporter) and local.path == tmp_path / "traces" / "svc.jsonl"
    local.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    remote = _exporter("svc")
    assert isinstance(remote, OTLPSpanExporter)
    remote.shutdown()
