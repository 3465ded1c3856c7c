"""moemesh eval perplexity against transformers' loss on the same tiny dense Llama and text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moemesh.cli.main import main
from moemesh.evaluation.perplexity import split_windows

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building.\n"
        " = Gameplay = \n\nIts base is square, measuring 125 metres on each side. During its construction, the Eiffel "
        "Tower surpassed the Washington Monument to become the tallest man-made structure in the world.\n")


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory, builtin_dense_dir: Path) -> Path:
    from moemesh.builtin.tiny import DENSE_ARCH, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_dense_eval"), arch=DENSE_ARCH, seed=3,
                           tokenizer_from=builtin_dense_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    return path


def reference_nll(model_dir: Path, windows: list[list[int]]) -> tuple[float, int]:
    """Sum of NLL and predictions from transformers' own loss (mean over each window's shifted labels)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([ids])
            total += model(x, labels=x).loss.item() * (len(ids) - 1)
            count += len(ids) - 1
    return total, count


def tokens(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT).ids


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["eval", "perplexity", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_one_window_matches_transformers_loss(tiny_dense: Path, text_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ids = tokens(tiny_dense)
    total, count = reference_nll(tiny_dense, [ids])
    out = run_json(capsys, "--model", str(tiny_dense), "--text", str(text_file))
    assert out["windows"] == 1 and out["window"] == len(ids) and out["tokens"] == len(ids)
    assert out["predictions"] == count and out["text_tokens"] == len(ids)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_windows_and_max_tokens(tiny_dense: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = tokens(tiny_dense)[:50]
    windows = [ids[0:16], ids[16:32], ids[32:48], ids[48:50]]
    total, count = reference_nll(tiny_dense, windows)
    out = run_json(capsys, "--model", str(tiny_dense), "--text", str(text_file), "--max-tokens", "50",
                   "--window", "16", "--batch", "3")
    assert (out["windows"], out["window"], out["tokens"], out["predictions"], out["max_tokens"]) == (4, 16, 50, 46, 50)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    expected_keys = {"model", "model_dir", "text", "text_sha256", "perplexity", "mean_nll", "tokens", "predictions",
                     "windows", "window", "max_tokens", "text_tokens", "device", "dtype", "seconds", "backend",
                     "quantization", "kv_cache_dtype"}
    assert set(out) == expected_keys and out["kv_cache_dtype"] == "auto"


def test_plain_output_and_errors(tiny_dense: Path, text_file: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "perplexity", "--model", str(tiny_dense), "--text", str(text_file), "--max-tokens", "20"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "perplexity", "--model", str(tiny_dense), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--model", str(tiny_dense), "--text", str(text_file), "--window", "1"]) == 2
    assert "window=1" in capsys.readouterr().err


def test_split_windows_drops_a_trailing_single_token() -> None:
    assert split_windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert split_windows(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="window=1"):
        split_windows([1, 2], 1)
