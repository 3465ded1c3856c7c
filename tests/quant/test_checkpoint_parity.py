"""`quantize_model` output (compressed-tensors) loaded three ways on tiny transformers-written models: the torch
Engine, transformers itself (compressed-tensors decompressing), and the ONNX Runtime backend; bad files fail at load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
import hf_tiny  # noqa: E402

from moemesh.quant.formats import QuantConfigError  # noqa: E402
from moemesh.quant.quantizer import QuantSettings, quantize_model  # noqa: E402
from moemesh.runtime.engine import Engine  # noqa: E402

IDS = [1, 5, 9, 33, 100, 7, 8, 200, 3]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """arch -> (float dir, int4 compressed-tensors dir); group 16 divides every K of the tiny configs."""
    cache = {}

    def get(arch: str, bits: int = 4):
        if (arch, bits) not in cache:
            root = tmp_path_factory.mktemp(f"{arch}{bits}")
            src = hf_tiny.save(hf_tiny.build_model(arch), root / "float")
            quantize_model(src, root / "q", QuantSettings(bits=bits, method="rtn", group_size=16), log=lambda _: None)
            cache[(arch, bits)] = (src, root / "q")
        return cache[(arch, bits)]
    return get


# Dense only: transformers 5.24 re-fuses per-expert tensors on load and drops the asymmetric zero points on the way
# ("Asymmetric quant requires zero-point values"), so it cannot be the reference for quantized experts.
@pytest.mark.parametrize("arch", ["llama"])
def test_engine_matches_transformers_on_the_quantized_checkpoint(quantized, arch: str) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, qdir = quantized(arch)
    ref = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float32, attn_implementation="eager",
                                               quantization_config=CompressedTensorsConfig(run_compressed=False))
    expected = hf_tiny.reference_logits(ref.eval(), IDS)
    got = Engine.load(qdir, kv_blocks=4).forward_logits([IDS])[0]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_int4_stays_close_to_the_float_model(quantized, arch: str) -> None:
    src, qdir = quantized(arch)
    full = Engine.load(src, kv_blocks=4).forward_logits([IDS])[0]
    q4 = Engine.load(qdir, kv_blocks=4).forward_logits([IDS])[0]
    assert 0 < (q4 - full).abs().max() < 0.25 * full.abs().max()  # quantized, but still the same model


def _corrupt(qdir: Path, out: Path, edit) -> Path:
    out.mkdir()
    for f in qdir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(qdir / "model.safetensors"))
    edit(tensors, json.loads((qdir / "config.json").read_text()), out)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_missing_scales_fail_at_load_naming_tensor_and_field(quantized, tmp_path: Path) -> None:
    _, qdir = quantized("llama")
    bad = _corrupt(qdir, tmp_path / "bad", lambda t, c, o: t.pop("model.layers.1.mlp.down_proj.weight_scale"))
    with pytest.raises(QuantConfigError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight_scale' is missing.*"
                                               r"config_groups"):
        Engine.load(bad, kv_blocks=4)


def test_wrong_group_size_fails_at_load(quantized, tmp_path: Path) -> None:
    _, qdir = quantized("llama")

    def regroup(tensors, config, out):
        for group in config["quantization_config"]["config_groups"].values():
            group["weights"]["group_size"] = 32
        (out / "config.json").write_text(json.dumps(config))
    bad = _corrupt(qdir, tmp_path / "bad", regroup)
    with pytest.raises(QuantConfigError, match=r"weight_scale'.*group_size 32"):
        Engine.load(bad, kv_blocks=4)


def _edit_config(edit):
    """A _corrupt edit that changes config.json's quantization_config in place."""
    def apply(tensors, config, out):
        edit(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    return apply


def _first_group(q: dict) -> dict:
    return next(iter(q["config_groups"].values()))["weights"]


# Unknown or inconsistent configs, each failing at Engine.load with the field (and the tensor where there is one).
BAD_CONFIGS = {
    "unknown method": (lambda q: q.update(quant_method="bitsandbytes"), r"quant_method 'bitsandbytes'"),
    "unknown format": (lambda q: q.update(format="marlin-24"), r"format 'marlin-24'"),
    "3-bit weights": (lambda q: _first_group(q).update(num_bits=3), r"config_groups\.group_0\.weights.*num_bits 3"),
    "unknown strategy": (lambda q: _first_group(q).update(strategy="block"), r"weights\.strategy 'block'"),
    "no target matches": (lambda q: next(iter(q["config_groups"].values())).update(targets=["nothing"]),
                          r"'model\.layers\.\d+\.[\w.]+\.weight_packed'.*config_groups target"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unknown_or_inconsistent_config_fails_at_load_naming_the_field(quantized, tmp_path: Path, case: str) -> None:
    edit, message = BAD_CONFIGS[case]
    _, qdir = quantized("llama")
    with pytest.raises(ValueError, match=message):  # QuantConfigError, or the spec's ConfigError for the method
        Engine.load(_corrupt(qdir, tmp_path / "bad", _edit_config(edit)), kv_blocks=4)


def test_missing_zero_points_of_an_asymmetric_checkpoint_fail_at_load(quantized, tmp_path: Path) -> None:
    _, qdir = quantized("llama")
    bad = _corrupt(qdir, tmp_path / "bad", lambda t, c, o: t.pop("model.layers.0.self_attn.o_proj.weight_zero_point"))
    with pytest.raises(QuantConfigError, match=r"'model\.layers\.0\.self_attn\.o_proj\.weight_zero_point' is missing"
                                               r".*'symmetric'"):
        Engine.load(bad, kv_blocks=4)

