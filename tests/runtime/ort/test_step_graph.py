"""The ONNX Runtime backend's one-call decode step (moemesh/runtime/ort/step_graph.py, step_path.py) against its own
per-layer path on the same int4 checkpoints (tiny transformers-written models): logits of ragged batches and of one
sequence (whose new K/V rows are written into the pools in place), the routed experts when every token selects every
expert, the cases that keep the per-layer path, and the built-in MoE served from its float checkpoint.

MatMulNBits runs at accuracy level 1 here (float activations), so the two paths agree to float32 rounding; at the
default level 4 each path rounds its own activations to int8 and they drift apart by that rounding's noise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import hf_tiny  # noqa: E402

from moemesh.quant.quantizer import QuantSettings, quantize_model  # noqa: E402
from moemesh.runtime.engine import Engine  # noqa: E402
from moemesh.runtime.ort import step_graph  # noqa: E402
from moemesh.runtime.types import SamplingParams, SequenceWork  # noqa: E402

PROMPTS = [[1, 5, 9, 33, 100, 7, 8, 200, 3], [4, 11, 50, 6, 70, 2], [9, 90, 19, 91]]


@pytest.fixture(autouse=True)
def float_activations(monkeypatch) -> None:
    monkeypatch.setenv("MOEMESH_ORT_ACCURACY", "1")


def _model(arch: str, top_k: int | None):
    config_cls, model_cls, extra = hf_tiny._configs()[arch]
    if top_k is not None:
        extra = {**extra, "num_experts_per_tok": top_k}
    torch.manual_seed(0)
    return model_cls(config_cls(**hf_tiny.COMMON, **extra)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(arch: str, top_k: int | None = None):
        if (arch, top_k) not in cache:
            root = tmp_path_factory.mktemp(f"step_{arch}{top_k}")
            src = hf_tiny.save(_model(arch, top_k), root / "float")
            quantize_model(src, root / "q", QuantSettings(bits=4, method="rtn", group_size=16), log=lambda _: None)
            cache[(arch, top_k)] = root / "q"
        return cache[(arch, top_k)]
    return get


def _calls(monkeypatch) -> list:
    calls = []
    run = step_graph.StepGraph.run

    def counted(self, *args):
        calls.append(args[0].shape[0])
        return run(self, *args)
    monkeypatch.setattr(step_graph.StepGraph, "run", counted)
    return calls


def _decode(layers: Engine, graph: Engine, prompts: list[list[int]], steps: int) -> float:
    """Teacher-forced greedy decode on both engines (the per-layer engine's tokens fed to both); the largest logit
    difference relative to the largest logit."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    works = [SequenceWork(f"s{i}", p, 0, params) for i, p in enumerate(prompts)]
    positions = [len(p) for p in prompts]
    worst = 0.0
    for step in range(steps + 1):
        (ra, la), (_, lb) = layers.step_with_logits(works), graph.step_with_logits(works)
        if step:  # the prompt step is a prefill: both engines run the per-layer path
            worst = max(worst, ((la - lb).abs().max() / la.abs().max()).item())
        works = [SequenceWork(f"s{i}", [r.token_id], positions[i] + step, params) for i, r in enumerate(ra)]
    return worst


@pytest.mark.parametrize("arch,top_k", [("llama", None), ("mixtral", 4)])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_decode_step_is_one_call_and_matches_the_layer_path(checkpoint, monkeypatch, arch, top_k, batch):
    """Dense, and MoE with every expert selected (4 of 4): one StepGraph call per decode step, logits within float32
    rounding of the per-layer path; ragged contexts (9, 6 and 4 tokens) mask each other's padding."""
    calls = _calls(monkeypatch)
    qdir = checkpoint(arch, top_k)
    layers = Engine.load(qdir, kv_blocks=16, backend="onnxruntime")
    layers.backbone.step_path.off = "the reference"
    graph = Engine.load(qdir, kv_blocks=16, backend="onnxruntime")
    worst = _decode(layers, graph, PROMPTS[:batch], steps=5)
    assert graph.backbone.step_path.off == "" and calls == [batch] * 5
    assert worst < 1e-4, worst


def test_routed_experts_count_every_token_on_the_step_graph(checkpoint):
    """The routed-token counters (Prometheus moemesh_expert_tokens_total) see the graph's routing: every hosted
    expert of every MoE layer takes every token, as the per-layer path counts it."""
    from moemesh.runtime.expert_load import ExpertLoad

    qdir = checkpoint("mixtral", 4)
    engines = [Engine.load(qdir, kv_blocks=16, backend="onnxruntime") for _ in range(2)]
    engines[0].backbone.step_path.off = "the reference"
    loads = [ExpertLoad.attach(e.backbone) for e in engines]
    _decode(*engines, PROMPTS[:2], steps=3)
    assert engines[1].backbone.step_path.graph is not None
    assert torch.equal(loads[0].counts, loads[1].counts) and int(loads[1].counts.sum()) > 0


def test_sparse_routing_keeps_the_layer_path(checkpoint, monkeypatch):
    """Top-2 of 4 experts: the graph would compute every expert, so the per-layer path runs (and says why)."""
    calls = _calls(monkeypatch)
    engine = Engine.load(checkpoint("mixtral"), kv_blocks=16, backend="onnxruntime")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = engine.step([SequenceWork("s", PROMPTS[0], 0, params)])
    engine.step([SequenceWork("s", [out[0].token_id], len(PROMPTS[0]), params)])
    assert calls == [] and "all selected" in engine.backbone.step_path.off


def test_the_builtin_moe_keeps_its_gguf_grid_and_decodes_in_one_call(monkeypatch):
    """The built-in smollm2-moe from its float checkpoint: GGUF-born projections on their exact int4 codes
    (quant/grid.on_grid; Router.Info "int4 grid + int8": the MoE's permuted down projections and the LM head are
    int8), every expert in process and selected, so each decode step is one call; within float32 rounding of the
    per-layer path."""
    from moemesh.models.registry import resolve_model

    calls = _calls(monkeypatch)
    moe = resolve_model("smollm2-moe", progress=False)
    layers, graph = (Engine.load(moe, kv_blocks=8, backend="onnxruntime") for _ in range(2))
    layers.backbone.step_path.off = "the reference"
    assert graph.info.quantization == "int4 grid + int8" and graph.backbone.schemes == {"int4 grid", "int8"}
    assert _decode(layers, graph, PROMPTS[:2], steps=3) < 1e-4 and calls == [2] * 3
