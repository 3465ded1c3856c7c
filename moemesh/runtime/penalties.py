"""Logit adjustments beyond OpenAI's presence/frequency penalties: logit_bias and HF's repetition penalty.

Both act on the raw logits before temperature (as in vLLM): logit_bias adds its value to the named tokens;
repetition_penalty p divides a positive logit by p and multiplies a negative one by p, for every token seen in the
prompt or the completion (state.seen), so p > 1 makes any repeat less likely whatever the logit's sign.
"""

from __future__ import annotations

import torch

MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> None:
    """In place on logits [N, V]; biases: per row, (token id, bias) pairs."""
    rows, toks, vals = [], [], []
    for i, pairs in enumerate(biases):
        for token, bias in pairs:
            if 0 <= token < logits.shape[1]:
                rows.append(i)
                toks.append(token)
                vals.append(bias)
    if rows:
        dev = logits.device
        index = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
        logits.index_put_(index, torch.tensor(vals, device=dev, dtype=logits.dtype), accumulate=True)


def apply_repetition_penalty(logits: torch.Tensor, penalties: list[float], seen: list[set[int]]) -> None:
    """In place on logits [N, V]: HF semantics over each row's seen tokens; penalty 1 (or 0) leaves a row alone."""
    rows, toks, factors = [], [], []
    for i, (p, tokens) in enumerate(zip(penalties, seen)):
        if p in (0.0, 1.0) or not tokens:
            continue
        rows.extend([i] * len(tokens))
        toks.extend(tokens)
        factors.extend([p] * len(tokens))
    if rows:
        dev = logits.device
        index = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
        values = logits[index]
        p = torch.tensor(factors, device=dev, dtype=logits.dtype)
        logits.index_put_(index, torch.where(values > 0, values / p, values * p))
