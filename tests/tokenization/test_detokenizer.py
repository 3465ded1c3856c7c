"""IncrementalDetokenizer: deltas never split a character and always add up to decode(all ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from moemesh.tokenization.chat_tokenizer import ChatTokenizer
from moemesh.tokenization.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Paris 😀👍🏽 is 東京 not 北京; 🇫🇷 flag, family 👨‍👩‍👧, ok.",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼 and Ωmega 12345 ",
    "<|im_start|>assistant\nHi! 🙂<|im_end|>",
]


@pytest.fixture(scope="module")
def tok(builtin_dense_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(builtin_dense_dir)


def _stream(tok: ChatTokenizer, ids: list[int], chunk: int = 1, skip: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.feed(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_add_up_and_never_split_a_character(tok: ChatTokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text)
    deltas = _stream(tok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # valid text: nothing was left to flush


def test_emoji_spanning_tokens_is_held_back_then_emitted_whole(tok: ChatTokenizer) -> None:
    ids = tok.encode(" 😀")
    assert len(ids) >= 2  # the emoji's 4 bytes span several byte-level tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.feed(ids[-1]) == " 😀"


def test_skip_special_tokens(tok: ChatTokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nYes<|im_end|>")
    assert "".join(_stream(tok, ids, skip=True)) == tok.decode(ids, skip_special_tokens=True) == "assistant\nYes"


def test_unfinished_character_is_flushed_as_replacement(tok: ChatTokenizer) -> None:
    ids = tok.encode("ok 😀")[:-1]  # stream stopped in the middle of the emoji
    detok = IncrementalDetokenizer(tok)
    emitted = "".join(detok.feed(i) for i in ids)
    assert emitted == "ok"
    assert emitted + detok.flush() == tok.decode(ids) and tok.decode(ids).endswith("\ufffd")


def test_pieces_for_logprobs(tok: ChatTokenizer) -> None:
    ids = tok.encode("a 中")
    detok = IncrementalDetokenizer(tok)
    delta, pieces = detok.feed_with_pieces(ids)
    assert delta == "a 中" and [p.token_id for p in pieces] == ids
    assert b"".join(p.bytes for p in pieces) == "a 中".encode()
    assert detok.token_ids == ids and detok.text == "a 中"


def _sentencepiece_dir(tmp_path: Path) -> Path:
    """A Llama-2 style tokenizer (Metaspace spaces, <0x..> byte fallback, decoder strips the leading space)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = [("▁", "h"), ("l", "l"), ("▁h", "e"), ("ll", "o"), ("▁he", "llo"), ("▁", "w")]
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d"] + ["".join(m) for m in merges]:
        vocab.setdefault(piece, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return tmp_path


def test_sentencepiece_byte_fallback_tokenizer(tmp_path: Path) -> None:
    tok = ChatTokenizer.load(_sentencepiece_dir(tmp_path))
    text = "hello wörld 😀 hello"
    ids = tok.encode(text)
    assert any(tok.tokenizer.id_to_token(i).startswith("<0x") for i in ids)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert b"".join(tok.token_piece(i).bytes for i in ids).decode() == " " + text  # "▁" pieces keep the space
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1
