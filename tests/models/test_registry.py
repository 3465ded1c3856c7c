"""resolve_model: built-in names (cached, atomic), local directories, Hugging Face ids, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moemesh.builtin.dense_export import SOURCE_FILE
from moemesh.models.atomic_dir import atomic_directory, build_lock
from moemesh.models.registry import list_builtin, resolve_model


def test_builtin_is_built_once_and_a_stale_cache_is_rebuilt(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MOEMESH_MODELS", str(tmp_path))
    stale = tmp_path / "smollm2"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / SOURCE_FILE).write_text(json.dumps({"export_version": 0}))
    (tmp_path / ".smollm2.tmp-crashed").mkdir()  # what a killed build leaves behind
    assert [(m.name, m.cached) for m in list_builtin()] == [("smollm2", False), ("smollm2-moe", False)]

    path = resolve_model("smollm2")
    assert path == stale and json.loads((path / "config.json").read_text())["num_hidden_layers"] == 30
    assert "building built-in model 'smollm2'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".smollm2.tmp")) == []
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2", progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert list_builtin()[0].cached


def test_local_directory(tiny_moe_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_moe_dir)) == tiny_moe_dir.resolve()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="smollm2, smollm2-moe"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model("  ")


def test_offline_hub_id_says_what_to_do(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="Offline.*--local-dir"):
        resolve_model("moemesh-test/definitely-not-a-repo", progress=False)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with build_lock(target), pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("crash mid-build")
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == [".model.lock"]
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(target) as tmp:  # replaces the previous complete build
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert oct(os.stat(target).st_mode & 0o777) == "0o755"

