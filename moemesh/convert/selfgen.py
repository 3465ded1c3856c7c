"""Text the dense model writes itself: the only data conversion calibrates and distills on (never held-out eval text).

Every sequence starts from a single token, so one batch needs no padding: half from "<|im_start|>" (the model writes
a chat turn, usually a user question, then answers it) when the tokenizer has one, the rest from a plain-text
starter token (a common sentence opening). Sampling: temperature 1, nucleus 0.95, seeded. A recorder passed to
`generate` sees every FFN's activations on the way, so calibration costs no second forward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moemesh.convert.model import Recorder, TrainableLlama

STARTER_WORDS = ("The", "In", "A", "It", "This", "He", "She", "On", "After", "During", "When", "As", "Its", "There",
                 "They", "We", "I", "For", "One", "His", "Her", "At", "By", "From", "Although", "However", "Many",
                 "According", "Some", "Most", "If", "How", "What", "Why", "Today", "Each")
CHAT_START = "<|im_start|>"
GEN_BATCH = 256  # sequences generated together (default)


def first_tokens(model_dir: Path, vocab_size: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """The first token of each of `count` sequences [count, 1]: chat starts, then plain-text starters."""
    starters, chat = _starter_tokens(model_dir)
    if not starters:  # no tokenizer: random single tokens
        starters = torch.randint(0, vocab_size, (64,), generator=gen).tolist()
    n_chat = count // 2 if chat is not None else 0
    pick = torch.randint(0, len(starters), (count - n_chat,), generator=gen)
    first = torch.cat([torch.full((n_chat,), chat if chat is not None else 0), torch.tensor(starters)[pick]])
    return first.long().unsqueeze(1)


def _starter_tokens(model_dir: Path) -> tuple[list[int], int | None]:
    """Single-token starter ids and the chat start token id (None without a chat template)."""
    if not (model_dir / "tokenizer.json").is_file():
        return [], None
    from moemesh.tokenization.chat_tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(model_dir)
    starters = []
    for word in STARTER_WORDS:
        ids = tok.encode(word, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in starters:
            starters.append(ids[0])
    chat = tok.tokenizer.token_to_id(CHAT_START) if tok.has_chat_template else None
    return starters, chat


def sample_next(logits: torch.Tensor, gen: torch.Generator, temperature: float = 1.0,
                top_p: float = 0.95) -> torch.Tensor:
    """Token ids [B] drawn from logits [B, V] with temperature and nucleus sampling."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix reaching top_p (always the first token)
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p, 1, generator=gen)
    return order.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def generate(model: TrainableLlama, prompts: torch.Tensor, length: int, gen: torch.Generator,
             recorder: Recorder | None = None, progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """Continue prompts [B, P] to [B, length] with the KV cache; `recorder` sees every token fed to the model."""
    cache: list = []
    logits = model(prompts, cache=cache, recorder=recorder)[:, -1]
    tokens = [prompts]
    for pos in range(prompts.shape[1], length):
        nxt = sample_next(logits, gen)
        tokens.append(nxt[:, None])
        if pos + 1 < length:
            logits = model(nxt[:, None], cache=cache, start=pos, recorder=recorder)[:, -1]
        if progress and (pos + 1) % 32 == 0:
            progress(f"  {prompts.shape[0]} sequences at token {pos + 1}/{length}")
    return torch.cat(tokens, dim=1)


def self_generated(model: TrainableLlama, model_dir: Path, count: int, length: int, seed: int,
                   progress: Callable[[str], None] | None = None, recorder: Recorder | None = None,
                   batch: int = GEN_BATCH) -> torch.Tensor:
    """`count` sequences of `length` tokens [count, length] (int64, on the model's device), seeded."""
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    first = first_tokens(model_dir, model.shape.vocab_size, count, torch.Generator().manual_seed(seed))
    out = []
    for chunk in first.split(batch):
        out.append(generate(model, chunk.to(device), length, gen, recorder, progress))
        if progress:
            progress(f"self-generated {sum(o.shape[0] for o in out)}/{count} sequences of {length} tokens")
    return torch.cat(out)
