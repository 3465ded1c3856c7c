"""`convert`: dense Llama directory -> MoE directory, cached by (source fingerprint, settings).

Steps: self-generated calibration text -> FFN activations -> per-layer partition + router calibration -> optional
distillation -> weights written next to the output and renamed into place (a half-written output never looks
complete). The same settings on the same source return the existing output at once; the files are a deterministic
function of (source, settings) on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moemesh.convert.calibration import build_student, calibrate
from moemesh.convert.checkpoint import MANIFEST, read_dense, build_dense, write_moe_dir
from moemesh.convert.distill import distill
from moemesh.convert.selfgen import self_generated
from moemesh.convert.settings import ALGORITHM_VERSION, ConvertSettings


def source_fingerprint(dense_dir: Path) -> str:
    """sha256 over config.json and every *.safetensors file of the dense directory."""
    digest = hashlib.sha256()
    for path in [dense_dir / "config.json", *sorted(dense_dir.glob("*.safetensors"))]:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def cached(out_dir: Path, fingerprint: str, settings: ConvertSettings) -> bool:
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file() or not (out_dir / "model.safetensors").is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return (manifest.get("source") == fingerprint and manifest.get("settings") == settings.to_json()
            and manifest.get("algorithm_version") == ALGORITHM_VERSION)


def make_logger(enabled: bool) -> Callable[[str], None]:
    start = time.perf_counter()

    def log(msg: str) -> None:
        if enabled:
            print(f"[convert {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def convert(dense_dir: str | Path, out_dir: str | Path, settings: ConvertSettings, *, device: str = "cpu",
            progress: bool = True) -> Path:
    """Convert (or reuse the cached conversion) and return out_dir."""
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    log = make_logger(progress)
    fingerprint = source_fingerprint(dense_dir)
    if cached(out_dir, fingerprint, settings):
        log(f"{out_dir} already holds this conversion (settings {settings.digest()}); reusing it")
        return out_dir
    torch.manual_seed(settings.seed)
    dense = read_dense(dense_dir)
    intermediate = dense.shape.intermediate_size
    log(f"converting {dense_dir} -> {out_dir}: {settings.experts} experts x {settings.check_ffn(intermediate)} "
        f"neurons, top-{settings.top_k}, shared {settings.shared_neurons}, "
        f"{settings.active_ffn_fraction(intermediate):.1%} of FFN parameters active, device {device}")
    teacher = build_dense(dense).to(device)
    student, hits = build_student(dense, calibrate(teacher, dense, settings, log), settings, log, device)
    manifest: dict[str, Any] = {
        "algorithm_version": ALGORITHM_VERSION, "source": fingerprint, "source_dir": str(dense_dir),
        "settings": settings.to_json(), "active_ffn_fraction": settings.active_ffn_fraction(intermediate),
        "router_hit_rate": hits,
    }
    if settings.distill_steps:
        student = student.to(device)
        data = self_generated(teacher, dense.path, math.ceil(settings.distill_tokens / settings.seq_len),
                              settings.seq_len, settings.seed + 1, log)
        report = distill(teacher, student, data, settings, log)
        log(f"distilled {report.steps} steps in {report.seconds:.0f}s: held-out KL "
            f"{report.heldout_kl_before:.4f} -> {report.heldout_kl_after:.4f}")
        manifest["distill"] = {k: v for k, v in report.to_json().items() if k != "seconds"}
    _write_atomic(out_dir, lambda tmp: write_moe_dir(tmp, dense, student.cpu(), settings, manifest))
    log(f"wrote {out_dir}")
    return out_dir


def _write_atomic(out_dir: Path, write: Callable[[Path], None]) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700, safetensors 0600: readable like any checkpoint
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

