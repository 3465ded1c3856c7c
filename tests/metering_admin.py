"""Metering's admin RPCs need the admin token: tests/conftest.py sets MOEMESH_ADMIN_TOKEN for every process a test
starts; blocking stubs present it through this interceptor."""

from __future__ import annotations

import os

import grpc


class AdminToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `x-moemesh-admin-token` to every call (metering's admin RPCs require it)."""

    def _with_token(self, details):
        metadata = [*(details.metadata or ()), ("x-moemesh-admin-token", os.environ["MOEMESH_ADMIN_TOKEN"])]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready, self.compression, self.metadata = base.wait_for_ready, base.compression, metadata
