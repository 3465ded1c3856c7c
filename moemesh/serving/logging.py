"""Log lines that carry the trace: every record gets `trace_id` and `span_id` of the span active where it was logged
("-" outside any span), so a log line leads to its trace in `moemesh trace` or the OTLP backend."""

from __future__ import annotations

import logging
import os
import sys

from opentelemetry import trace

FORMAT = "%(asctime)s %(levelname)s %(service)s %(name)s [trace_id=%(trace_id)s span_id=%(span_id)s] %(message)s"


class TraceContextFilter(logging.Filter):
    """Adds trace_id/span_id (hex) of the current span, and the service name, to each record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = f"{ctx.trace_id:032x}" if ctx.is_valid else "-"
        record.span_id = f"{ctx.span_id:016x}" if ctx.is_valid else "-"
        record.service = self.service
        return True


def setup_logging(service: str, level: str | None = None) -> None:
    """Root logging to stderr with the trace context (`moemesh up` sends each service's stderr to its log file).
    Level: `level`, else MOEMESH_LOG_LEVEL, else INFO. Idempotent: replaces an earlier moemesh handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_moemesh", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._moemesh = True  # type: ignore[attr-defined]
    handler.addFilter(TraceContextFilter(service))
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("MOEMESH_LOG_LEVEL") or "INFO").upper())
