"""Log-probabilities of prompt tokens (vLLM's `prompt_logprobs`, OpenAI completions' `echo` with `logprobs`).

Row j of a work fed at position p holds the logits after token p + j, which score token p + j + 1. So the prompt
token at position q is scored by the row of position q - 1: the row before it in the same work, or, for the first
token of a later prefill chunk, the last row of the previous chunk (kept here between steps as its log-softmax
`tail`, [V] float32, only for sequences that asked). Position 0 has no logprob (None), as in OpenAI and vLLM.

The distribution is the raw model's (log_softmax of the logits; no temperature, penalties, bias or grammar), which
is what vLLM returns and what scoring (perplexity, lm-eval's loglikelihood) needs. Only sequences that ask cost
anything: the engine computes logits for every row of their prompt chunks, and for the other works only the
sampled rows. A sequence that asks takes no prefix-cache hits for its prompt (cached positions have no logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moemesh.runtime.types import SamplingParams, SequenceWork


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token: its log-probability given the tokens before it (None for the first), and the `n` most
    likely tokens at its position (id, logprob), most likely first."""

    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def prompt_end(params: SamplingParams, sampled: bool, work: SequenceWork) -> int:
    """Position where the prompt ends: params.prompt_tokens when the caller said; else everything fed before the
    sequence's first sample is prompt."""
    if params.prompt_tokens is not None:
        return params.prompt_tokens
    return 0 if sampled else work.position + len(work.token_ids)


def scores(params: SamplingParams | None, sampled: bool, work: SequenceWork) -> bool:
    """Whether the work feeds prompt tokens whose logprobs were asked for."""
    return params is not None and params.prompt_logprobs is not None and work.position < prompt_end(
        params, sampled, work)


def scored_works(works: list[SequenceWork], sampled: Callable[[str], bool]) -> dict[str, int]:
    """Sequence -> prompt end for the works that score prompt tokens; sampled(seq_id): whether the sequence
    sampled a token before (asked only of works that want prompt logprobs: others cost one attribute test)."""
    out = {}
    for w in works:
        if w.sampling is None or w.sampling.prompt_logprobs is None:
            continue
        done = sampled(w.seq_id)
        if scores(w.sampling, done, w):
            out[w.seq_id] = prompt_end(w.sampling, done, w)
    return out


def logit_rows(works: list[SequenceWork], new: list[int], scored: dict[str, int]):
    """Rows of a step (T = sum(new) tokens) to compute logits for: each sampling work's last row, every row of a
    scored work. Returns rows [R] int64, where the sampling rows are among them [N], and each scored work's
    (first, end) among them."""
    rows, sampled, spans, start = [], [], {}, 0
    for w, n in zip(works, new):
        if w.seq_id in scored:
            spans[w.seq_id] = (len(rows), len(rows) + n)
            rows.extend(range(start, start + n))
        elif w.sample:
            rows.append(start + n - 1)
        if w.sample:
            sampled.append(len(rows) - 1)
        start += n
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(sampled, dtype=torch.int64), spans


class PromptScorer:
    """Turns the logits of a scored work into PromptLogprobs, keeping each sequence's tail between chunks."""

    def __init__(self) -> None:
        self._tail: dict[str, torch.Tensor] = {}  # seq id -> [V] log-softmax of its last computed prompt row

    def score(self, work: SequenceWork, logits: torch.Tensor, end: int) -> list[PromptLogprob]:
        """logits: [L, V] of every row of the work (L = len(work.token_ids)); end: prompt_end(...). Returns one
        entry per token the work fed before `end`."""
        n_top = work.sampling.prompt_logprobs
        count = min(len(work.token_ids), end - work.position)  # prompt tokens of this work
        logp = torch.log_softmax(logits[:count].float(), dim=-1)  # [count, V]; later rows score no prompt token
        tail = self._tail.pop(work.seq_id, None) if work.position else None
        # The rows scoring this work's tokens: the previous chunk's tail, then rows 0 .. count - 2.
        before = logp[: count - 1]
        if tail is not None:
            before = torch.cat([tail.unsqueeze(0), before])  # [count, V]
        scored_ids = work.token_ids[:count] if tail is not None else work.token_ids[1:count]
        ids = torch.tensor(scored_ids, dtype=torch.int64, device=logp.device)
        own = before.gather(1, ids.unsqueeze(1)).squeeze(1).tolist() if len(scored_ids) else []
        top_vals, top_ids = [[]] * len(own), [[]] * len(own)
        if n_top and own:
            top_vals, top_ids = (t.tolist() for t in before.topk(min(n_top, before.shape[1]), dim=-1))
        out = [] if tail is not None else [PromptLogprob(None)]  # position 0 (nothing precedes it)
        out += [PromptLogprob(lp, tuple(zip(top_ids[k], top_vals[k]))) for k, lp in enumerate(own)]
        if work.position + count < end:  # the prompt goes on in a later chunk: keep the row that scores its head
            self._tail[work.seq_id] = logp[count - 1].clone()
        return out

    def forget(self, seq_id: str) -> None:
        self._tail.pop(seq_id, None)
