"""AWQ (quant/awq.py, awq_plan.py): on tiny models the tests build, with a few outlier activation channels (as real
LLMs have), the scale folding is exact in float, AWQ int4 has a smaller output error than round-to-nearest, and the
written checkpoint loads back (Engine, ONNX Runtime, transformers) to the model quantized in memory."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.builtin.tiny import DENSE_ARCH, make_tiny_model
from moemesh.quant.awq import Consumer, output_error, search_scale
from moemesh.quant.quantizer import QuantSettings, awq_scales, collect_hessians, quantize_model
from moemesh.runtime.checkpoint import Checkpoint
from moemesh.runtime.engine import Engine
from moemesh.tokenization.chat_tokenizer import ChatTokenizer

HELD_OUT = Path(__file__).parents[2] / "benchmarks" / "data" / "heldout_us_founding.txt"  # not the calibration text
CALIB = Path(__file__).parents[2] / "moemesh" / "quant" / "data" / "calib_en.txt"


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> QuantSettings:
    """AWQ int4 group 16 calibrated on the first ~500 tokens of the shipped calibration text (fast)."""
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(CALIB.read_text(encoding="utf-8")[:2500], encoding="utf-8")
    return QuantSettings(bits=4, method="awq", group_size=16, calib=str(calib), window=256)


def _with_outliers(model_dir: Path, seed: int = 1) -> Path:
    """4 channels of every RMSNorm weight x20: large-magnitude input channels, the case AWQ is for."""
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("layernorm.weight")]:
        w = torch.ones_like(tensors[name])
        w[torch.randperm(w.numel(), generator=g)[:4]] = 20.0
        tensors[name] = w
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory, builtin_dense_dir):
    """kind -> float dir: a dense llama and a MoE with a shared expert (4 experts, top-2), GQA in both."""
    root = tmp_path_factory.mktemp("awq")
    kw = {"dense": {"arch": DENSE_ARCH}, "moe": {"shared_expert_intermediate": 32}}
    return {k: _with_outliers(make_tiny_model(root / k, tokenizer_from=builtin_dense_dir, **v)) for k, v in kw.items()}


def _held_out_ids(model_dir: Path) -> list[int]:
    return ChatTokenizer.load(model_dir).encode(HELD_OUT.read_text(encoding="utf-8")[:3000])[:200]


def _logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    return Engine.load(model_dir, kv_blocks=8).forward_logits([ids])[0]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got - ref) ** 2).mean() / (ref**2).mean())


@pytest.mark.slow  # calibration + quantization of tiny models: 20-100 s on 2 busy cores
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_folding_the_scales_leaves_the_float_model_unchanged(models, settings, kind: str, tmp_path: Path) -> None:
    src = models[kind]
    hessians, fell = collect_hessians(src, settings, log=lambda _: None)
    with Checkpoint(src) as ckpt:
        plan = awq_scales(src, ckpt, hessians, fell, settings)
        tensors = {n: plan.apply(n, ckpt.read(n)).contiguous() for n in ckpt.names()}
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in plan.cols.values())  # something was scaled
    assert any(".mlp.gate.weight" in n for n in plan.cols) == (kind == "moe")  # the float router too
    out = tmp_path / "scaled"
    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = _held_out_ids(src)
    assert _rel_err(_logits(out, ids), _logits(src, ids)) < 1e-9


@pytest.mark.slow  # calibration + quantization of tiny models: 20-100 s on 2 busy cores
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_awq_int4_has_less_output_error_than_round_to_nearest(models, settings, awq_checkpoints, kind: str,
                                                             tmp_path: Path) -> None:
    src, ids = models[kind], _held_out_ids(models[kind])
    ref = _logits(src, ids)
    quantize_model(src, tmp_path / "rtn", replace(settings, method="rtn"), log=lambda _: None)
    err = {"rtn": _rel_err(_logits(tmp_path / "rtn", ids), ref),
           "awq": _rel_err(_logits(awq_checkpoints[kind][0], ids), ref)}
    assert err["awq"] < 0.6 * err["rtn"], err  # measured: about 0.3x on both


def test_alpha_zero_is_round_to_nearest_so_the_search_never_loses_on_its_inputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.where(torch.arange(64) < 4, 30.0, 1.0)  # 4 salient channels
    w = torch.randn(32, 64)
    c = Consumer(w, x.T @ x, 4)
    s, best, errors = search_scale([c], x.abs().mean(0), 16, False)
    assert best[0] > 0 and errors[best] == min(errors.values()) and errors[best] < 0.7 * errors[(0.0, False)]
    assert s[:4].min() > s[4:].max()  # the salient channels are scaled up
    assert output_error(torch.zeros(3, 64), c.hessian) == 0.0


def _float_copy(src: Path, out: Path, tensors: dict) -> Path:
    out.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def awq_checkpoints(models, settings, tmp_path_factory):
    """kind -> (written AWQ checkpoint, float checkpoint of the same model quantized in memory and dequantized)."""
    from moemesh.quant.packing import QWeight
    from moemesh.quant.quantizer import quantize_tensors

    root, out = tmp_path_factory.mktemp("awq_ckpt"), {}
    for kind, src in models.items():
        items, _, _ = quantize_tensors(src, settings, log=lambda _: None)
        deq = {n: t.dequantize() if isinstance(t, QWeight) else t for n, t in items.items()}
        quantize_model(src, root / f"{kind}-awq", settings, log=lambda _: None)
        out[kind] = (root / f"{kind}-awq", _float_copy(src, root / f"{kind}-mem", deq))
    return out


@pytest.mark.slow  # calibration + quantization of tiny models: 20-100 s on 2 busy cores
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_awq_checkpoint_loads_back_to_the_in_memory_quantized_model(models, awq_checkpoints, kind: str) -> None:
    written, in_memory = awq_checkpoints[kind]
    config = json.loads((written / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["moemesh_quantization"]["method"] == "awq" and config["moemesh_quantization"]["awq_alphas"]
    engine = Engine.load(written, kv_blocks=8)
    assert engine.info.quantization == "int4 awq group 16 (compressed-tensors)"
    ids = _held_out_ids(models[kind])
    got, expected = engine.forward_logits([ids])[0], _logits(in_memory, ids)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.slow  # calibration + quantization of tiny models: 20-100 s on 2 busy cores
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_onnxruntime_backend_serves_the_awq_checkpoint(models, awq_checkpoints, kind: str) -> None:
    written, in_memory = awq_checkpoints[kind]
    ids = _held_out_ids(models[kind])[:48]
    ort = Engine.load(written, kv_blocks=8, backend="onnxruntime").forward_logits([ids])[0]
    expected = _logits(in_memory, ids)
    assert _rel_err(ort, expected) < 1e-3  # MatMulNBits quantizes activations to int8 internally: close, not exact


@pytest.mark.slow  # calibration + quantization of tiny models: 20-100 s on 2 busy cores
def test_transformers_loads_the_dense_awq_checkpoint(models, awq_checkpoints) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    written, _ = awq_checkpoints["dense"]
    ref = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32, attn_implementation="eager",
                                               quantization_config=CompressedTensorsConfig(run_compressed=False))
    ids = _held_out_ids(models["dense"])[:48]
    with torch.no_grad():
        expected = ref.eval()(torch.tensor([ids])).logits[0]
    got = _logits(written, ids)
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()


@pytest.mark.slow  # calibration + quantization of tiny models: 20-100 s on 2 busy cores
def test_experts_with_too_few_routed_tokens_keep_unit_down_scales(models, settings) -> None:
    """The few-token rule (awq_plan.FALLBACK): such an expert's down_proj gets no scale; its gate/up still join the
    layer's shared search (on the layer-wide Hessian); the shared expert, always on, is scaled as usual."""
    src, few = models["moe"], replace(settings, min_tokens=10**6)
    hessians, fell = collect_hessians(src, few, log=lambda _: None)
    assert len(fell) == 2 * 4  # every routed expert of both layers
    with Checkpoint(src) as ckpt:
        plan = awq_scales(src, ckpt, hessians, fell, few)
    downs = sorted(n for n in plan.cols if "down_proj" in n)
    assert downs == [f"model.layers.{i}.mlp.shared_expert.down_proj.weight" for i in (0, 1)]
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in plan.cols


def test_duo_scaling_adds_weight_aware_candidates_and_never_loses_to_x_only() -> None:
    from moemesh.quant.awq import ALPHAS, weight_means

    torch.manual_seed(1)
    x = torch.randn(512, 64) * torch.where(torch.arange(64) % 9 == 0, 20.0, 1.0)
    c = Consumer(torch.randn(32, 64) * torch.where(torch.arange(64) < 8, 5.0, 1.0), x.T @ x, 4)
    w_mean = weight_means([c.weight], 16)
    assert w_mean.shape == (64,) and 0 < float(w_mean.min()) and float(w_mean.max()) <= 1
    _, best, errors = search_scale([c], x.abs().mean(0), 16, False, w_mean=w_mean)
    assert len(errors) == 2 * len(ALPHAS) and errors[best] == min(errors.values())
    _, x_only, x_errors = search_scale([c], x.abs().mean(0), 16, False)
    assert errors[best] <= x_errors[x_only]
