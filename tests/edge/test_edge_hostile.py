"""Hostile input against the running edge over real sockets (HTTP and gRPC, the real mesh behind Envoy): every
generated case gets a 4xx / INVALID_ARGUMENT-like answer naming the problem (never a 5xx or a server fault), a valid
request right after still succeeds, and no process dies. benchmarks/hostile.py runs thousands of these."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from edge_harness import EdgeMesh
from hostile_cases import http_cases
from hostile_grpc import grpc_cases
from hostile_run import Probe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CASES = int(os.environ.get("MOEMESH_HOSTILE_CASES", "100"))  # per protocol
VALID_EVERY = 5  # a valid request after every this many hostile ones (and after the last)
SETTINGS = settings(max_examples=CASES, deadline=None, database=None, derandomize=False,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def probe(edge_mesh: EdgeMesh):
    p = Probe(edge_mesh.url, edge_mesh.ca_cert, edge_mesh.model, edge_mesh.api_key)
    yield p
    p.close()


def _after(probe: Probe, sent: list[int]) -> None:
    sent[0] += 1
    if sent[0] % VALID_EVERY == 0:
        assert probe.valid_http() and probe.valid_grpc(), "a valid request failed after hostile ones"


def test_hostile_http_requests_are_rejected_by_name(probe: Probe, edge_mesh: EdgeMesh) -> None:
    sent = [0]

    @SETTINGS
    @given(case=http_cases(edge_mesh.model, edge_mesh.api_key))
    def one(case) -> None:
        verdict = probe.http(case)
        assert verdict.ok, verdict
        _after(probe, sent)

    one()
    assert probe.valid_http() and probe.valid_grpc()
    assert all(edge_mesh.alive().values()) and edge_mesh.proc.poll() is None


def test_hostile_grpc_calls_are_rejected_by_name(probe: Probe, edge_mesh: EdgeMesh) -> None:
    sent = [0]

    @SETTINGS
    @given(case=grpc_cases(edge_mesh.model, edge_mesh.api_key))
    def one(case) -> None:
        verdict = probe.grpc(case)
        assert verdict.ok, verdict
        _after(probe, sent)

    one()
    assert probe.valid_http() and probe.valid_grpc()
    assert all(edge_mesh.alive().values()) and edge_mesh.proc.poll() is None
