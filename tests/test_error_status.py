"""Domain errors name a domain status (moemesh.errors.ErrorStatus), never a gRPC code: no `grpc_status` attribute is
left in the source (the edge, moemesh/serving/errors.py, is the one place that maps to gRPC), and every ErrorStatus
has a gRPC code of its name."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from moemesh.errors import ErrorStatus

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("moemesh", "services", "gateway")


def grpc_status_attributes(text: str) -> list[str]:
    """Lines that set or read a `grpc_status` attribute (`grpc_status = ...`, `.grpc_status`)."""
    return [line.strip() for line in text.splitlines()
            if re.search(r"^\s*grpc_status\s*[:=]|\.grpc_status\b|getattr\([^)]*[\'\"]grpc_status[\'\"]", line)]


def test_no_grpc_status_attribute_in_the_source():
    found = {}
    for package in SOURCES:
        for path in (ROOT / package).rglob("*.py"):
            if "/v1/" not in str(path):
                lines = grpc_status_attributes(path.read_text())
                if lines:
                    found[str(path.relative_to(ROOT))] = lines
    assert found == {}, f"domain errors carry `status = ErrorStatus.X` (moemesh/errors.py), not grpc_status: {found}"


def test_the_scan_sees_each_form():
    text = 'class A(Exception):\n    grpc_status = "UNAVAILABLE"\n        self.grpc_status = "INTERNAL"\n' \
           'x = getattr(exc, "grpc_status", None)\nlog = {"grpc_status": "%GRPC_STATUS%"}\n'
    assert len(grpc_status_attributes(text)) == 3  # the Envoy log field name is no attribute


def test_every_error_status_is_a_grpc_code():
    assert all(isinstance(grpc.StatusCode[s.name], grpc.StatusCode) for s in ErrorStatus)
