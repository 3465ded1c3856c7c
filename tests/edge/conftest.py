"""Fixtures of the edge tests: a temporary MOEMESH_HOME (certificates, logs), the fake Chat gateway, and a real
Envoy in front of it on a free port (real TLS, real sockets). The full mesh with its edge is in edge_harness.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_harness
from edge_fake_chat import FakeGateway
from edge_harness import EdgeMesh
from moemesh.edge import EdgeProcess, launch


@pytest.fixture(scope="module")
def edge_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MOEMESH_HOME for one test module (restored afterwards)."""
    home = tmp_path_factory.mktemp("edge-home")
    before = os.environ.get("MOEMESH_HOME")
    os.environ["MOEMESH_HOME"] = str(home)
    try:
        yield home
    finally:
        if before is None:
            os.environ.pop("MOEMESH_HOME", None)
        else:
            os.environ["MOEMESH_HOME"] = before


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[FakeGateway]:
    gateway = FakeGateway()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def edge(edge_home: Path, fake_gateway: FakeGateway) -> Iterator[EdgeProcess]:
    """Envoy in front of the fake gateway; a rate limit high enough not to get in the way."""
    process = launch([fake_gateway.address], port=0, rate_limit_rps=10_000, rate_limit_burst=10_000)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def edge_mesh(tmp_path_factory: pytest.TempPathFactory, tiny_moe_dir: Path) -> Iterator[EdgeMesh]:
    """`moemesh up --edge` on the tiny MoE, shared by the mesh tests of every edge test module."""
    mesh = edge_harness.start(tmp_path_factory.mktemp("edge-mesh-home"), tiny_moe_dir, "--edge-rps", "5000")
    yield mesh
    edge_harness.stop(mesh.proc)
