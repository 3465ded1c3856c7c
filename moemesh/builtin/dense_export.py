"""GGUF -> HF-style Llama checkpoint directory (what `smollm2` resolves to and what the runtime/transformers load).

Writes config.json, generation_config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json and
moemesh_source.json (provenance + EXPORT_VERSION, so a cache built by an older exporter is rebuilt). The caller
makes it atomic (moemesh.models.registry writes into a temp dir and renames).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

from moemesh.builtin.gguf_reader import GgufLlama
from moemesh.builtin.gguf_tokenizer import write_tokenizer_files

EXPORT_VERSION = 1
SOURCE_FILE = "moemesh_source.json"


def llama_config(gguf: GgufLlama, has_output: bool) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from the GGUF's llama.* metadata."""
    n_head = int(gguf.arch("attention.head_count"))
    hidden = int(gguf.arch("embedding_length"))
    tokens = gguf.metadata("tokenizer.ggml.tokens")
    eos = gguf.metadata("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(gguf.arch("feed_forward_length")),
        "num_hidden_layers": int(gguf.arch("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(gguf.arch("attention.head_count_kv", n_head)),
        "head_dim": int(gguf.arch("rope.dimension_count", hidden // n_head)),
        "vocab_size": int(gguf.arch("vocab_size", len(tokens))),
        "max_position_embeddings": int(gguf.arch("context_length")),
        "rms_norm_eps": float(gguf.arch("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(gguf.arch("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,  # GGUF omits output.weight when the head is the embedding
        "bos_token_id": int(gguf.metadata("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(eos),
        "pad_token_id": int(gguf.metadata("tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def eos_token_ids(gguf: GgufLlama) -> list[int]:
    """The GGUF's EOS first, then the other end-of-generation control tokens llama.cpp also stops on."""
    tokens = gguf.metadata("tokenizer.ggml.tokens")
    ids = [int(gguf.metadata("tokenizer.ggml.eos_token_id"))]
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if name in tokens[:1024] and tokens.index(name) not in ids:
            ids.append(tokens.index(name))
    return ids


def export_dense(gguf_path: str | Path, out_dir: str | Path, *, log: Callable[[str], None] | None = None) -> Path:
    """Write the HF checkpoint of `gguf_path` into `out_dir` (created; existing files overwritten)."""
    log = log or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    gguf = GgufLlama.open(gguf_path)
    log(f"read {Path(gguf_path).name} ({len(gguf.reader.tensors)} tensors) in {time.perf_counter() - start:.1f}s")
    tensors = dict(gguf.tensors())
    log(f"dequantized {sum(t.size for t in tensors.values()) / 1e6:.1f}M parameters")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it 0600
    config = llama_config(gguf, has_output="lm_head.weight" in tensors)
    eos = eos_token_ids(gguf)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}
    write_tokenizer_files(gguf, out)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation)
    source = {"gguf": Path(gguf_path).name, "export_version": EXPORT_VERSION, "name": gguf.metadata("general.name", "")}
    _write_json(out / SOURCE_FILE, source)
    log(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def stderr_log(msg: str) -> None:
    print(f"[moemesh] {msg}", file=sys.stderr, flush=True)
