"""The runtime serves the built-in checkpoint and the tiny MoE with the real tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moemesh.runtime.engine import Engine
from moemesh.runtime.generate import generate
from moemesh.runtime.types import SamplingParams
from moemesh.tokenization.chat_tokenizer import ChatTokenizer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_runtime_greedy_answers_paris(builtin_dense_dir: Path) -> None:
    tok = ChatTokenizer.load(builtin_dense_dir)
    ids, _ = tok.encode_chat(FRANCE)
    engine = Engine.load(builtin_dense_dir, kv_blocks=8)
    [done] = generate(engine, [ids], SamplingParams(max_tokens=16), decode=tok.decode)
    assert done.finish_reason == "stop" and done.token_ids[-1] in tok.eos_token_ids
    assert done.text.strip() == "The capital of France is Paris."


def test_the_packed_backend_keeps_the_gguf_grid_and_answers_paris(builtin_dense_dir: Path) -> None:
    """The built-in's projections are GGUF Q4_1 blocks dequantized: packed, they keep those exact int4 codes (the
    LM head, Q8_0 in the GGUF, becomes int8 per row)."""
    from moemesh.runtime.packed_layers import PackedLinear

    tok = ChatTokenizer.load(builtin_dense_dir)
    ids, _ = tok.encode_chat(FRANCE)
    engine = Engine.load(builtin_dense_dir, kv_blocks=8, backend="packed")
    layer = engine.backbone.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 5 and {m.weight.scheme for m in linears} == {"int4"}  # q/k/v fused, o, gate, up, down
    assert engine.backbone.packed_head.scheme == "int8" and engine.info.quantization == "int4 grid + int8"
    [done] = generate(engine, [ids], SamplingParams(max_tokens=16), decode=tok.decode)
    assert done.text.strip() == "The capital of France is Paris."


def test_runtime_runs_the_tiny_moe(tiny_moe_dir: Path) -> None:
    tok = ChatTokenizer.load(tiny_moe_dir)
    ids, _ = tok.encode_chat(FRANCE)
    engine = Engine.load(tiny_moe_dir, kv_blocks=8)
    [done] = generate(engine, [ids], SamplingParams(max_tokens=5, ignore_eos=True), decode=tok.decode)
    assert len(done.token_ids) == 5 and all(0 <= t < tok.vocab_size for t in done.token_ids)


def test_tiny_moe_with_all_experts_on_is_the_concatenated_dense_llama(tmp_path: Path, tiny_moe_dir: Path) -> None:
    """Agreed layout check: unit weighting + top_k == E sums every expert, i.e. one dense FFN whose neurons are the
    experts' neurons side by side (gate/up rows, down columns)."""
    import json

    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import LlamaForCausalLM

    from moemesh.builtin.tiny import DENSE_ARCH, make_tiny_model
    from moemesh.runtime.types import SequenceWork

    moe = make_tiny_model(tmp_path / "moe", top_k=4, router_weighting="unit", tokenizer_from=tiny_moe_dir)
    dense = make_tiny_model(tmp_path / "dense", arch=DENSE_ARCH, tokenizer_from=tiny_moe_dir)
    w = load_file(str(moe / "model.safetensors"))
    merged = {n: a for n, a in w.items() if ".mlp." not in n}
    for i in range(2):
        for proj, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            parts = [w[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(4)]
            merged[f"model.layers.{i}.mlp.{proj}.weight"] = np.concatenate(parts, axis=axis)
    save_file(merged, str(dense / "model.safetensors"))
    assert json.loads((dense / "config.json").read_text())["intermediate_size"] == 4 * 32

    ids = ChatTokenizer.load(moe).encode("The capital of France is")
    engine = Engine.load(moe, kv_blocks=4)
    _, logits = engine.step_with_logits([SequenceWork("s", ids, 0)])
    ref = LlamaForCausalLM.from_pretrained(dense, dtype=torch.float32)(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(logits[0], ref, atol=1e-4)
