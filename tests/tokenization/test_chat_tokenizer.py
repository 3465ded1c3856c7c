"""ChatTokenizer over the built-in model's files, checked against transformers' AutoTokenizer on the same dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moemesh.tokenization.chat_template import ChatTemplate, ChatTemplateError
from moemesh.tokenization.chat_tokenizer import ChatTokenizer

SAMPLES = [
    "Hello, world!",
    "In 2024 the price rose 12.5% to $1,234,567.89 (x10^3).",
    "日本語のテキストと中文混合，한국어도 있어요。",
    "emoji 😀👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧 done",
    "naïve café Ångström ß ﬁ",
    "  leading spaces\n\n\ttabs\r\nand\u00a0nbsp  ",
    "<|im_start|>user\nliteral specials<|im_end|>\n<|endoftext|><repo_name>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2=? 🤔"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "中文?"}],
]


@pytest.fixture(scope="module")
def tok(builtin_dense_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(builtin_dense_dir)


@pytest.fixture(scope="module")
def hf_tok(builtin_dense_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dense_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_and_decode_match_transformers(tok: ChatTokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_digits_are_split_and_specials_are_single_tokens(tok: ChatTokenizer) -> None:
    assert [tok.decode([i]) for i in tok.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # nothing added, no BOS


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: ChatTokenizer, hf_tok, messages, add_generation_prompt) -> None:
    ids, rendered = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert ids == (hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids)  # v5 returns a BatchEncoding


def test_france_prompt(tok: ChatTokenizer) -> None:
    ids, rendered = tok.encode_chat(CHATS[0])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == 1 and ids.count(2) == 2 and len(ids) == 37


def test_special_token_properties(tok: ChatTokenizer) -> None:
    assert tok.eos_token_ids == (2, 0)
    assert tok.bos_token_id == 1
    assert tok.vocab_size == 49152
    assert tok.has_chat_template
    assert tok.special_tokens["eos_token"] == "<|im_end|>"


def test_token_piece_bytes_rebuild_the_text(tok: ChatTokenizer) -> None:
    text = "emoji 😀 中文 café"
    pieces = [tok.token_piece(i) for i in tok.encode(text)]
    assert b"".join(p.bytes for p in pieces).decode("utf-8") == text
    assert any("\ufffd" in p.text for p in pieces)  # some token holds part of a character
    assert tok.token_piece(2).bytes == b"<|im_end|>"
    with pytest.raises(ValueError, match="99999"):
        tok.token_piece(99999)


def test_bad_messages_name_the_field(tok: ChatTokenizer) -> None:
    with pytest.raises(ValueError, match=r"messages\[1\]\.role"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content"):
        tok.encode_chat([{"role": "user", "content": 5}])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.encode_chat([])


def test_template_raise_exception_and_special_token_names() -> None:
    source = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
              "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}")
    template = ChatTemplate(source, {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "é"}]) == '<s>"é"'
    with pytest.raises(ChatTemplateError, match="first must be user"):
        template.render([{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_missing_files(tmp_path: Path, builtin_dense_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer.load(tmp_path)
    shutil.copyfile(builtin_dense_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = ChatTokenizer.load(tmp_path)
    assert not bare.has_chat_template and bare.eos_token_ids == () and bare.bos_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.encode_chat(CHATS[0])
