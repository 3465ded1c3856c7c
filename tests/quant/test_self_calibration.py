"""Data-free calibration text (moemesh.quant.self_calibration): the model samples it, reproducibly, and GPTQ runs on
it through `quantize_model(calib="self")`, keeping the text beside the weights."""

from __future__ import annotations

from pathlib import Path

from moemesh.quant.quantizer import QuantSettings, quantize_model
from moemesh.quant.self_calibration import requests, write_self_calibration


def test_requests_differ_in_register_and_subject() -> None:
    asked = requests()
    assert len(set(asked)) == len(asked) >= 32
    assert asked[0].split()[:3] != asked[1].split()[:3] and asked[0].split()[-1] != asked[1].split()[-1]


def test_the_text_is_sampled_reproducibly_and_gptq_calibrates_on_it(tiny_moe_dir: Path, tmp_path: Path) -> None:
    first = write_self_calibration(tiny_moe_dir, tmp_path / "a.txt", sequences=3, max_tokens=24).read_text()
    again = write_self_calibration(tiny_moe_dir, tmp_path / "b.txt", sequences=3, max_tokens=24).read_text()
    assert first == again and len(first.split()) > 10
    logs: list[str] = []
    summary = quantize_model(tiny_moe_dir, tmp_path / "q", QuantSettings(method="gptq", group_size=16, calib="self"),
                             log=logs.append)
    assert summary["calib"] == str(tmp_path / "q" / "calibration_self.txt")
    assert (tmp_path / "q" / "calibration_self.txt").stat().st_size > 100
    assert any("calibrated on" in line for line in logs)
