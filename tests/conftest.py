"""Fixtures shared by every test package: the built-in dense SmolLM2 checkpoint and a tiny MoE with its tokenizer.

MOEMESH_MODELS defaults to a persistent per-machine cache (~/.cache/moemesh-test-models) for the whole session, so
the GGUF -> HF conversion runs once per machine, also for subprocesses the tests start.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEST_MODELS_CACHE = Path.home() / ".cache" / "moemesh-test-models"
# Every metering a test starts (in process or as a child) accepts this admin token; tests present it for admin RPCs.
TEST_ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123456789"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MOEMESH_MODELS", str(TEST_MODELS_CACHE))
    os.environ.setdefault("MOEMESH_ADMIN_TOKEN", TEST_ADMIN_TOKEN)


@pytest.fixture(scope="session")
def builtin_dense_dir() -> Path:
    """HF checkpoint dir of the built-in `smollm2` (converted from the GGUF on first use, then cached)."""
    from moemesh.models.registry import resolve_model

    return resolve_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory, builtin_dense_dir: Path) -> Path:
    """Tiny random MoemeshLlamaMoeForCausalLM (4 experts, top-2, softmax weighting, hidden 64, 2 layers, seed 0)
    with SmolLM2's real tokenizer files (copied from the cached built-in: faster than re-reading the GGUF)."""
    from moemesh.builtin.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_moe"), tokenizer_from=builtin_dense_dir)
