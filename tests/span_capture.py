"""Spans of this test process in memory: the one OpenTelemetry SDK provider of the process (whichever test set it up
first) gets an in-memory exporter, for tests that read the spans a service wrote."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.serving import setup_tracing


def memory_exporter(service: str) -> InMemorySpanExporter:
    provider = setup_tracing(service)  # the process's one SDK provider, whoever set it up first
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
