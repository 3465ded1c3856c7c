"""What `moemesh up` shows while starting (moemesh/cli/progress.py), on real log files written as services write
them. The whole `up` output of a real start is checked in tests/edge/test_edge_first_hour.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from moemesh import home
from moemesh.cli.progress import StartProgress, first_start_note, interesting

SERVICE_LINE = ("2026-11-30 06:20:01,123 INFO tokenizer services.tokenizer.catalog [trace_id=0 span_id=0] "
                "tokenizer for 'smollm2-moe' loaded from /m (vocab 49152)")


def test_conversion_and_loading_lines_are_shown_and_noise_is_not() -> None:
    assert interesting("[convert   12.0s] calibrating layer 3/30\n") == "[convert   12.0s] calibrating layer 3/30"
    assert interesting("[moemesh] built 'smollm2' in 15.1s") == "[moemesh] built 'smollm2' in 15.1s"
    assert interesting("[convert  275.9s] layer 10/30: coactivation partition") is not None
    assert interesting("[convert  276.9s] layer 11/30: coactivation partition") is None  # every 10th layer only
    assert interesting(SERVICE_LINE) == "tokenizer for 'smollm2-moe' loaded from /m (vocab 49152)"
    assert interesting("2026-11-30 06:20:01,123 INFO gateway x [trace_id=0 span_id=0] health check ok") is None
    assert interesting("==== 2026-11-30 starting python -m gateway") is None


def test_first_start_says_how_long_it_takes_only_while_the_model_is_missing(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.delenv("MOEMESH_MODELS", raising=False)
    assert home.models_dir() == tmp_path / "models"
    note = first_start_note("smollm2-moe")
    assert note is not None and "first start" in note and "minutes" in note
    (tmp_path / "models" / "smollm2-moe").mkdir(parents=True)
    (tmp_path / "models" / "smollm2-moe" / "config.json").write_text("{}")
    assert first_start_note("smollm2-moe") is None
    assert first_start_note(str(tmp_path / "some-checkpoint")) is None  # not built here: nothing to promise


def test_new_log_lines_reach_the_console_and_silence_says_who_is_still_starting(tmp_path: Path) -> None:
    logs = {"tokenizer": tmp_path / "tokenizer.log", "router": tmp_path / "router.log"}
    logs["tokenizer"].write_text("[moemesh] from an earlier run: not shown\n")
    said: list[str] = []
    with StartProgress(logs, tmp_path, said.append, quiet_s=0.3, poll_s=0.05):
        with logs["tokenizer"].open("a") as f:
            f.write("[convert    1.0s] converting a -> b\n[convert    2.0s] half a li")  # the last line unfinished
        time.sleep(0.3)
        with logs["tokenizer"].open("a") as f:
            f.write("ne\n")
        (tmp_path / "tokenizer.json").write_text("{}")  # the tokenizer's ready file: SERVING
        time.sleep(0.6)
    text = "\n".join(said)
    assert "earlier run" not in text
    assert "tokenizer  [convert    1.0s] converting a -> b" in text
    assert "[convert    2.0s] half a line" in text  # a line is shown once it is complete
    assert any("still starting router" in line and "tokenizer" not in line for line in said), said
    assert said[-1].startswith("  all 2 services SERVING after")
