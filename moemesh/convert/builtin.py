"""The built-in `smollm2-moe`: what moemesh.models.registry calls on first use."""

from __future__ import annotations

from pathlib import Path

from moemesh.convert.pipeline import convert
from moemesh.convert.settings import ConvertSettings


def convert_builtin_moe(dense_dir: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Default settings (8 experts, top-8 = all on, unit weighting: exactly the dense function), on the CPU."""
    return convert(dense_dir, out_dir, ConvertSettings(), progress=progress)
