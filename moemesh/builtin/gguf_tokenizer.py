"""The HF tokenizer files (tokenizer.json, tokenizer_config.json) rebuilt from a GGUF's `tokenizer.ggml.*` metadata.

Supported: tokenizer model `gpt2` (byte-level BPE). The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`:
`smollm` (and the StarCoder family) split every digit on its own before the GPT-2 ByteLevel regex. Control tokens
(token_type 3) become special added tokens, user-defined ones (4) plain added tokens, so "<|im_start|>" in text
is one token. Nothing is added around an encoding (tokenizer.ggml.add_bos_token is false for SmolLM2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from moemesh.builtin.gguf_reader import GgufLlama

CONTROL, USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer names whose HF equivalent is Digits(individual) + ByteLevel(regex).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}


def build_tokenizer(gguf: GgufLlama) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the GGUF's vocabulary, merges and pre-tokenizer."""
    model_name = gguf.metadata("tokenizer.ggml.model")
    if model_name != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model_name!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens: list[str] = gguf.metadata("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf.metadata("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens holds duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(gguf.metadata("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # ByteLevel post-processing only fixes offsets; it adds no tokens (trim_offsets off as in the HF original).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = gguf.metadata("tokenizer.ggml.token_type")
    tok.add_special_tokens([_added(tokens[i]) for i, t in enumerate(types) if t == CONTROL])
    tok.add_tokens([_added(tokens[i], special=False) for i, t in enumerate(types) if t == USER_DEFINED])
    return tok


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    raise ValueError(f"tokenizer.ggml.pre is {pre!r}; supported: {sorted(_DIGIT_SPLIT_PRE | {'default', 'gpt2'})}")


def _added(content: str, special: bool = True) -> AddedToken:
    return AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)


def tokenizer_config(gguf: GgufLlama) -> dict[str, Any]:
    """tokenizer_config.json: special tokens by name, the chat template, no BOS added (HF's GPT2 fast tokenizer)."""
    tokens: list[str] = gguf.metadata("tokenizer.ggml.tokens")
    types = gguf.metadata("tokenizer.ggml.token_type")

    def token(key: str) -> str | None:
        idx = gguf.metadata(f"tokenizer.ggml.{key}_token_id", None)
        return None if idx is None else tokens[int(idx)]

    decoder = {
        str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": t == CONTROL}
        for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)
    }
    config: dict[str, Any] = {
        "add_bos_token": bool(gguf.metadata("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf.metadata("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf.arch("context_length", 2048)),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = gguf.metadata("tokenizer.chat_template", None)
    if template:
        config["chat_template"] = template
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tokenizer_files(gguf: GgufLlama, out_dir: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json of the GGUF into out_dir."""
    out = Path(out_dir)
    build_tokenizer(gguf).save(str(out / "tokenizer.json"))
    text = json.dumps(tokenizer_config(gguf), indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
