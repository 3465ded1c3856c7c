"""A model's tokenizer as the mesh uses it: tokenizer.json (HF `tokenizers`) + tokenizer_config.json + chat template.

encode() is exactly the model's tokenizer (its own post-processor; nothing added by us). encode_chat() renders the
chat template (which writes the special tokens as text) and encodes without the post-processor, as HF's
apply_chat_template does, so BOS is never doubled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders

from moemesh.tokenization.chat_template import ChatTemplate
from moemesh.tokenization.tool_prompt import with_tools
from moemesh.tokenization.token_bytes import byte_level_token_bytes, sentencepiece_token_bytes

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")  # generation_config.json sampling defaults


@dataclass(frozen=True)
class TokenPiece:
    """One token as text alone (U+FFFD where it holds part of a character) and as its exact bytes."""

    token_id: int
    text: str
    bytes: bytes


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config special tokens are a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template:
        return template
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return _read_json(model_dir / "chat_template.json").get("chat_template")


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value] if isinstance(value, list) else []


class ChatTokenizer:
    """Tokenizer + chat template of one checkpoint directory."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], chat_template: str | None,
                 eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.special_tokens = {n: t for n in _SPECIAL_NAMES if (t := _token_content(config.get(n))) is not None}
        self._template = ChatTemplate(chat_template, self.special_tokens) if chat_template else None
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id = tokenizer.token_to_id(bos) if bos else None
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._generation_defaults: dict[str, float] = {}  # load() reads them from generation_config.json

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (needed for the model's tokenizer)")
        tokenizer = Tokenizer.from_file(str(path))
        config = _read_json(model_dir / "tokenizer_config.json")
        # EOS: generation_config's list first (what generate() stops on), then config.json, then the named token.
        generation = _read_json(model_dir / "generation_config.json")
        eos = _as_id_list(generation.get("eos_token_id"))
        eos += _as_id_list(_read_json(model_dir / "config.json").get("eos_token_id"))
        eos_name = _token_content(config.get("eos_token"))
        if eos_name and tokenizer.token_to_id(eos_name) is not None:
            eos.append(tokenizer.token_to_id(eos_name))
        made = cls(tokenizer, config, _chat_template_source(model_dir, config), eos)
        made._generation_defaults = {k: int(v) if k == "top_k" else float(v) for k in _DEFAULT_KEYS
                                     if isinstance(v := generation.get(k), (int, float)) and not isinstance(v, bool)}
        return made

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` exactly as the model's tokenizer gives them (its post-processor included)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json chat_template is missing)")
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    @property
    def template_supports_tools(self) -> bool:
        """Whether the chat template renders `tools` itself (else tool_prompt.py writes them into the prompt)."""
        return self._template is not None and "tools" in self._template.source

    @property
    def generation_defaults(self) -> dict[str, float]:
        """Sampling defaults of generation_config.json (temperature, top_p, top_k, repetition_penalty) it sets."""
        return dict(self._generation_defaults)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **extra: Any) -> tuple[list[int], str]:
        """(ids, rendered prompt) of a conversation; the template already wrote BOS/role tokens as text. Tools go
        to the template when it renders them, else into the system prompt (tool_prompt.py)."""
        if tools and self.template_supports_tools:
            extra["tools"] = tools
        elif tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            messages = with_tools(messages, tools or [])
        rendered = self.render_chat(messages, add_generation_prompt, **extra)
        return self.encode(rendered, add_special_tokens=False), rendered

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_piece(self, token_id: int) -> TokenPiece:
        """A token alone: its text and its exact bytes (for logprobs)."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        raw: bytes | None = None
        if token_id in self._added:
            raw = self._added[token_id].encode("utf-8")
        elif self._byte_level:
            raw = byte_level_token_bytes(token)
        if raw is None:
            raw = sentencepiece_token_bytes(token) if "<0x" in token or "▁" in token else text.encode("utf-8")
        return TokenPiece(token_id=token_id, text=text, bytes=raw)
