"""The raw bytes a single token stands for (for logprobs `bytes` and to reason about partial characters).

Byte-level BPE (GPT-2 family: SmolLM2, Qwen, DeepSeek, OLMoE) spells every byte as one printable character
(bytes_to_unicode); SentencePiece byte fallback spells a byte as "<0xE6>" and a space as "▁". Added tokens are their
content in UTF-8.
"""

from __future__ import annotations

import re

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 kept, the rest shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def byte_level_token_bytes(token: str) -> bytes | None:
    """Bytes of a byte-level BPE token string; None when a character is not in the byte alphabet."""
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def sentencepiece_token_bytes(token: str) -> bytes:
    match = _BYTE_FALLBACK.match(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")
