"""Perplexity of a model on a text file, through the serving runtime's full-sequence forward.

The text is read as exact UTF-8 bytes and tokenized by the model's own tokenizer (its post-processor decides what is
added; for SmolLM2 nothing). The first `max_tokens` tokens are cut into consecutive windows of `window` tokens (the
last one may be shorter; a window of one token predicts nothing and is dropped); inside a window token t is scored
from tokens 0..t-1, so a window of W tokens scores W - 1 predictions. perplexity = exp(mean NLL over all scored
predictions). Windows run batched through `Engine.forward_logits`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

LOGITS_BUDGET_BYTES = 512 << 20  # float32 logits of one batch of windows


@dataclass(frozen=True)
class PerplexityResult:
    model: str
    model_dir: str
    text: str
    text_sha256: str
    perplexity: float
    mean_nll: float
    tokens: int  # tokens scored over (the first max_tokens of the text)
    predictions: int  # tokens predicted (tokens minus one per window)
    windows: int
    window: int
    max_tokens: int | None
    text_tokens: int  # tokens in the whole text
    device: str
    dtype: str
    seconds: float
    quantization: str = "none"  # weight-only quantization of the experts / dense FFN (Engine.load)
    backend: str = "torch"  # torch or onnxruntime (Engine.load)
    kv_cache_dtype: str = "auto"  # auto or fp8: K/V rounded as the cache would hold them (Engine.load)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_text(path: str | Path) -> tuple[str, str]:
    """(text, sha256 of its bytes); bytes decoded as UTF-8 exactly (no newline translation)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text {str(path)!r} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--text {str(path)!r} is not UTF-8: {exc}") from exc


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens; a trailing window of a single token is dropped (it scores nothing)."""
    if window < 2:
        raise ValueError(f"window={window} must be at least 2 tokens")
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [c for c in chunks if len(c) >= 2]


def window_nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """(sum of NLL, predictions) of one window: logits [L, V] at each position predict the next token."""
    target = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return float(-logprobs.gather(-1, target[:, None]).sum(dtype=torch.float64)), len(ids) - 1


def score_windows(engine: Any, windows: list[list[int]], batch: int) -> tuple[float, int]:
    """(total NLL, predictions) over windows, `batch` windows per forward."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        group = windows[start:start + batch]
        for logits, ids in zip(engine.forward_logits(group), group, strict=True):
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
    return total, count


def default_batch(window: int, vocab_size: int) -> int:
    return max(1, LOGITS_BUDGET_BYTES // (window * vocab_size * 4))


def evaluate_perplexity(model: str, text_path: str | Path, *, max_tokens: int | None = None,
                        window: int | None = None, batch: int | None = None, device: str = "cpu",
                        dtype: str = "float32", progress: bool = False, quantization: str = "none",
                        backend: str = "torch", kv_cache_dtype: str = "auto") -> PerplexityResult:
    from moemesh.models.registry import resolve_model
    from moemesh.runtime.engine import Engine
    from moemesh.tokenization.chat_tokenizer import ChatTokenizer

    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens {max_tokens} must be at least 2")
    model_dir = resolve_model(model, progress=progress)
    text, sha = read_text(text_path)
    ids = ChatTokenizer.load(model_dir).encode(text)  # the tokenizer's own post-processor, nothing added by us
    scored = ids[:max_tokens] if max_tokens is not None else ids
    engine = Engine.load(model_dir, device=device, dtype=dtype, kv_blocks=1, quantization=quantization,
                         backend=backend, kv_cache_dtype=kv_cache_dtype)
    context = engine.spec.max_context
    window = window or min(len(scored), context)
    if window > context:
        raise ValueError(f"--window {window} exceeds the model's context of {context} tokens")
    windows = split_windows(scored, window)
    if not windows:
        raise ValueError(f"--text {str(text_path)!r} gives {len(scored)} tokens: nothing to score")
    start = time.perf_counter()
    total, count = score_windows(engine, windows, batch or default_batch(window, engine.spec.vocab_size))
    return PerplexityResult(
        model=model, model_dir=str(model_dir), text=str(text_path), text_sha256=sha,
        perplexity=math.exp(total / count), mean_nll=total / count, tokens=sum(len(w) for w in windows),
        predictions=count, windows=len(windows), window=window, max_tokens=max_tokens, text_tokens=len(ids),
        device=device, dtype=dtype, seconds=round(time.perf_counter() - start, 3), quantization=quantization,
        backend=backend, kv_cache_dtype=kv_cache_dtype,
    )
