"""Session fixtures of tests/runtime: tiny transformers checkpoints (see hf_tiny.py) with their reference models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # hf_tiny, whatever pytest's import mode

import hf_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory):
    """tiny_hf(arch, fused=False) -> (checkpoint dir, transformers reference model); built once per session."""
    cache: dict[tuple[str, bool], tuple[Path, object]] = {}

    def get(arch: str, fused: bool = False) -> tuple[Path, object]:
        if (arch, fused) not in cache:
            model = hf_tiny.build_model(arch)
            path = hf_tiny.save(model, tmp_path_factory.mktemp(f"{arch}_fused" if fused else arch), fused=fused)
            # Same seed, same weights: the fused layout is checked against the per-expert checkpoint's reference.
            cache[(arch, fused)] = (path, get(arch)[1] if fused else hf_tiny.load_reference(path))
        return cache[(arch, fused)]

    return get
