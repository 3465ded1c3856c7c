"""load_format="dummy": random weights from config.json alone, for every supported architecture; the tensors the
loaders ask for have the shapes of the real checkpoint's."""

from __future__ import annotations

import shutil

import pytest
import torch

from moemesh.runtime.checkpoint import Checkpoint
from moemesh.runtime.dummy import DummyCheckpoint, tensor_shapes
from moemesh.runtime.engine import Engine
from moemesh.runtime.spec import load_spec
from moemesh.runtime.types import SequenceWork

import hf_tiny


@pytest.mark.parametrize("arch", hf_tiny.ARCHS)
def test_dummy_engine_runs_and_matches_real_shapes(tiny_hf, tmp_path, arch):
    real_dir, _ = tiny_hf(arch)
    config_only = tmp_path / arch
    config_only.mkdir()
    shutil.copy(real_dir / "config.json", config_only / "config.json")  # no weights at all
    engine = Engine.load(config_only, load_format="dummy", kv_blocks=8, block_size=4)
    results, logits = engine.step_with_logits([SequenceWork("a", [3, 4, 5], 0)])
    assert torch.isfinite(logits).all() and results[0].token_id is not None
    spec = load_spec(config_only)
    with Checkpoint(real_dir) as real:
        common = [n for n in tensor_shapes(spec) if n in real]
        assert len(common) > 4 * spec.num_layers, "dummy names follow the transformers layout"
        for name in common:
            assert DummyCheckpoint(config_only, spec).shape(name) == real.shape(name), name


def test_dummy_tensors_are_seeded_by_name_and_sized_to_stay_finite(tiny_hf):
    real_dir, _ = tiny_hf("qwen3_moe")
    spec = load_spec(real_dir)
    a, b = DummyCheckpoint(real_dir, spec), DummyCheckpoint(real_dir, spec)
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(a.read(name), b.read(name), rtol=0, atol=0)  # shards agree on one model
    assert not torch.equal(a.read(name), a.read("model.layers.0.self_attn.q_proj.weight"))
    assert abs(a.read(name).std().item() - 0.02) < 0.005
    assert torch.equal(a.read("model.norm.weight"), torch.ones(spec.hidden_size))
    expert = a.read_rows("model.layers.0.mlp.experts.gate_up_proj", 3)
    assert list(expert.shape) == [2 * spec.moe.intermediate_size, spec.hidden_size]


def test_unknown_load_format_is_rejected(tiny_hf):
    real_dir, _ = tiny_hf("qwen3_moe")
    with pytest.raises(ValueError, match="load_format must be one of"):
        Engine.load(real_dir, load_format="random")
