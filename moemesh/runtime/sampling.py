"""Next-token sampling for a batch of sequences: penalties, temperature, top-k, top-p, seeds, logprobs.

Order of operations per row (the same as vLLM and HF's logits processors):
  1. presence/frequency penalties on the raw logits, over the tokens of the completion so far (OpenAI semantics:
     logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0); the prompt does not count);
  2. temperature: 0 is greedy argmax (deterministic, first index on ties), otherwise logits / temperature;
  3. top-k, then top-p over the distribution renormalised after top-k (the most likely token is always kept);
  4. one uniform draw per row from the sequence's own generator (or the global one when unseeded), inverted
     through the cumulative distribution; so the same seed and the same logits give the same token.

Logprobs (chosen token and top-n alternatives) come from log_softmax of the penalised, temperature-scaled logits,
BEFORE top-k/top-p truncation: truncation would give the chosen token an inflated probability and -inf to everything
outside the nucleus, which is useless for scoring. For greedy rows (temperature 0) the scaled distribution is
degenerate, so logprobs use temperature 1, i.e. the (penalised) model distribution, as OpenAI reports it.

Who calls what: the engine creates one `SeqSampleState.new(params, device)` when a sequence starts (position 0),
passes it to every `Sampler.sample` call for that sequence, and drops it on release. `sample` records each chosen
token in its state (`observe`); callers must not observe it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moemesh.runtime import grammar as grammars
from moemesh.runtime.penalties import MAX_LOGIT_BIAS, apply_logit_bias, apply_repetition_penalty
from moemesh.runtime.types import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_PENALTY = 2.0  # OpenAI accepts presence/frequency penalties in [-2, 2]
CANDIDATES = 512  # top-k/top-p look at this many most likely tokens first (see _draw_truncated)


@dataclass
class SeqSampleState:
    """Per-sequence sampling state: private generator (seeded sequences only) and completion token counts."""

    generator: torch.Generator | None
    counts: dict[int, int] = field(default_factory=dict)  # token id -> occurrences in the completion so far
    seen: set[int] = field(default_factory=set)  # prompt and completion tokens (repetition_penalty)
    grammar: grammars.SeqGrammar | None = None  # constrained decoding (runtime/grammar.py)
    replayed: int = 0  # completion tokens this state has seen (sampled here, or replayed after a recompute)

    @classmethod
    def new(cls, params: SamplingParams, device: torch.device | str = "cpu") -> SeqSampleState:
        """State for a sequence that starts now; the generator lives on `device` (where its draws are made)."""
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        return cls(generator=generator)

    def observe(self, token_id: int) -> None:
        """Count one generated token (feeds the penalties) and advance the grammar past it."""
        self.counts[token_id] = self.counts.get(token_id, 0) + 1
        self.seen.add(token_id)
        self.replayed += 1
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def fed(self, token_ids: list[int], position: int, prompt_tokens: int | None) -> None:
        """Tokens fed to the model at `position`: prompt tokens join `seen`; completion tokens this state has not
        observed (a preempted sequence recomputed from position 0) are replayed into counts and grammar."""
        self.seen.update(token_ids)
        if prompt_tokens is None:
            return
        for offset, token in enumerate(token_ids):
            if position + offset - prompt_tokens >= self.replayed:
                self.observe(token)


@dataclass
class SampleOut:
    """The chosen token of one row; logprob is None unless the row asked for logprobs."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely first


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"sampling.{name} must be {expected}, got {value!r}")


def validate(params: SamplingParams) -> None:
    """Raise ValueError naming the first bad field and its value; reusable by the gateway and the batcher.

    top_p = 0 is accepted as "off" because the protobuf contract (proto3 zero default) defines it so.
    """
    p = params
    _check(_is_real(p.temperature) and p.temperature >= 0, "temperature", p.temperature, "a finite number >= 0")
    _check(_is_real(p.top_p) and 0 <= p.top_p <= 1, "top_p", p.top_p, "a number in (0, 1] (0 also means off)")
    _check(_is_int(p.top_k) and p.top_k >= 0, "top_k", p.top_k, "an integer >= 0 (0: off)")
    seed_ok = p.seed is None or (_is_int(p.seed) and 0 <= p.seed < 2**64)
    _check(seed_ok, "seed", p.seed, "None or an integer in [0, 2**64)")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        in_range = _is_real(value) and abs(value) <= MAX_PENALTY
        _check(in_range, name, value, f"a number in [-{MAX_PENALTY}, {MAX_PENALTY}]")
    _check(_is_int(p.max_tokens) and p.max_tokens >= 1, "max_tokens", p.max_tokens, "an integer >= 1")
    ids_ok = all(_is_int(t) and t >= 0 for t in p.stop_token_ids)
    _check(ids_ok, "stop_token_ids", p.stop_token_ids, "non-negative integers")
    _check(all(isinstance(s, str) and s for s in p.stop), "stop", p.stop, "non-empty strings")
    _check(isinstance(p.logprobs, bool), "logprobs", p.logprobs, "a bool")
    top_ok = _is_int(p.top_logprobs) and 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS
    _check(top_ok, "top_logprobs", p.top_logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    _check(isinstance(p.ignore_eos, bool), "ignore_eos", p.ignore_eos, "a bool")
    bias_ok = all(_is_int(t) and t >= 0 and _is_real(b) and abs(b) <= MAX_LOGIT_BIAS for t, b in p.logit_bias)
    _check(bias_ok, "logit_bias", p.logit_bias, f"(token id >= 0, bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}])")
    rep_ok = _is_real(p.repetition_penalty) and 0 <= p.repetition_penalty <= 2
    _check(rep_ok, "repetition_penalty", p.repetition_penalty, "a number in (0, 2] (0 also means off)")


def wants_logprobs(params: SamplingParams) -> bool:
    """top_logprobs > 0 implies logprobs (lenient where OpenAI errors)."""
    return params.logprobs or params.top_logprobs > 0


class Sampler:
    """Stateless; all per-sequence state is in SeqSampleState."""

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], states: list[SeqSampleState]
    ) -> list[SampleOut]:
        """logits: [N, V] float32, one row per sequence; returns one SampleOut per row and observes each token."""
        tokens, logits = self.draw(logits, params, states)
        outs = self._with_logprobs(logits, tokens, params)
        for out, state in zip(outs, states):
            state.observe(out.token_id)
        return outs

    def draw(self, logits: torch.Tensor, params: list[SamplingParams],
             states: list[SeqSampleState]) -> tuple[torch.Tensor, torch.Tensor]:
        """The device half of sample(), no host sync: (tokens [N] int64, the logits after penalties, bias and
        grammar [N, V] float32). Observes nothing."""
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} must be [N, V] with N = {len(params)} params and states")
        logits = self._penalised(logits.float(), params, states)  # [N, V], a copy
        apply_logit_bias(logits, [p.logit_bias for p in params])
        apply_repetition_penalty(logits, [p.repetition_penalty for p in params], [s.seen for s in states])
        grammars.apply(logits, [s.grammar for s in states])  # -inf where a grammar forbids the token
        temps = [p.temperature for p in params]
        tokens = logits.argmax(dim=-1)  # [N]; greedy rows keep this
        sampled = [i for i, t in enumerate(temps) if t > 0]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            temp = torch.tensor([temps[i] for i in sampled], device=logits.device).unsqueeze(1)
            chosen = self._draw(logits[rows] / temp, [params[i] for i in sampled], [states[i] for i in sampled])
            tokens[rows] = chosen
        return tokens, logits

    @staticmethod
    def _penalised(logits: torch.Tensor, params: list[SamplingParams], states: list[SeqSampleState]) -> torch.Tensor:
        """Copy of logits with OpenAI presence/frequency penalties subtracted (one scatter for the whole batch)."""
        logits = logits.clone()
        rows, toks, amounts = [], [], []
        for i, (p, s) in enumerate(zip(params, states)):
            if p.presence_penalty == 0 and p.frequency_penalty == 0:
                continue
            for tok, count in s.counts.items():
                rows.append(i)
                toks.append(tok)
                amounts.append(p.frequency_penalty * count + p.presence_penalty)
        if rows:
            dev = logits.device
            index = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
            logits.index_put_(index, -torch.tensor(amounts, device=dev, dtype=logits.dtype), accumulate=True)
        return logits

    def _draw(self, scaled: torch.Tensor, params: list[SamplingParams], states: list[SeqSampleState]) -> torch.Tensor:
        """scaled: [M, V] temperature-scaled logits; returns [M] token ids drawn after top-k/top-p."""
        probs = torch.softmax(scaled, dim=-1)  # [M, V]
        u = self._uniforms(states, scaled.device)  # [M]
        tokens = torch.empty(len(params), dtype=torch.int64, device=scaled.device)
        truncated = [i for i, p in enumerate(params) if _truncates(p)]
        plain = [i for i, p in enumerate(params) if not _truncates(p)]
        if plain:
            rows = torch.tensor(plain, device=scaled.device)
            tokens[rows] = _inverse_cdf(probs[rows], u[rows])
        if truncated:
            rows = torch.tensor(truncated, device=scaled.device)
            tokens[rows] = _draw_truncated(probs[rows], [params[i] for i in truncated], u[rows])
        return tokens

    @staticmethod
    def _uniforms(states: list[SeqSampleState], device: torch.device) -> torch.Tensor:
        """[M] draws in [0, 1): one from each seeded row's own generator, one batch from the global generator."""
        u = torch.rand(len(states), device=device)
        for i, s in enumerate(states):
            if s.generator is not None:
                u[i] = torch.rand((), generator=s.generator, device=s.generator.device).to(device)
        return u

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[SampleOut]:
        """Attach logprobs (see the module doc for which distribution) to the rows that asked for them."""
        token_list = tokens.tolist()
        outs = [SampleOut(token_id=t) for t in token_list]
        asked = [i for i, p in enumerate(params) if wants_logprobs(p)]
        if not asked:
            return outs
        dev = logits.device
        rows = torch.tensor(asked, device=dev)
        temp = torch.tensor([params[i].temperature or 1.0 for i in asked], device=dev).unsqueeze(1)
        logp = torch.log_softmax(logits[rows] / temp, dim=-1)  # [A, V]
        chosen = logp.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
        n_top = min(max(params[i].top_logprobs for i in asked), logp.shape[1])
        top_vals, top_ids = logp.topk(n_top, dim=-1)  # [A, n_top], most likely first
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(asked):
            n = params[i].top_logprobs
            outs[i].logprob = chosen[j]
            outs[i].top_logprobs = list(zip(top_ids[j][:n], top_vals[j][:n]))
        return outs


def _truncates(params: SamplingParams) -> bool:
    return params.top_k > 0 or 0 < params.top_p < 1


def _draw_truncated(probs: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """probs: [M, V]; u: [M]. Draws after top-k/top-p from the CANDIDATES most likely tokens when they hold every
    row's whole kept set (top_k within them, or the nucleus mass reached), else from a full sort (exact either way;
    a full sort of a 50k vocabulary costs ~3 ms a row on one CPU core, the candidates ~0.3 ms)."""
    v = probs.shape[1]
    n_cand = min(v, max(CANDIDATES, *(p.top_k for p in params)))
    cand_p, order = probs.topk(n_cand, dim=-1)  # [M, K], most likely first
    kept, complete = _truncate_sorted(cand_p, params, whole=n_cand == v)
    if not bool(complete.all()):  # some nucleus reaches past the candidates (a flat distribution)
        cand_p, order = probs.sort(dim=-1, descending=True)
        kept, _ = _truncate_sorted(cand_p, params, whole=True)
    return order.gather(1, _inverse_cdf(kept, u).unsqueeze(1)).squeeze(1)


def _truncate_sorted(
    sorted_p: torch.Tensor, params: list[SamplingParams], whole: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_p: [M, K] the K largest probabilities of each row, descending (whole: K is the vocabulary).

    Returns kept [M, K]: top-k, then top-p over the renormalised top-k set, zeroing what they remove; and
    complete [M] bool: whether nothing past the K given tokens could have been kept."""
    dev = sorted_p.device
    top_k = torch.tensor([p.top_k for p in params], device=dev)  # [M]
    rank = torch.arange(sorted_p.shape[1], device=dev).unsqueeze(0)  # [1, K]
    kept = sorted_p * (rank < torch.where(top_k > 0, top_k, sorted_p.shape[1]).unsqueeze(1))
    # Renormalise over the top-k set; without top-k the set is the whole vocabulary, whose mass is 1.
    in_set = (top_k > 0) | whole  # [M]: the set lies within the K tokens
    kept = kept / torch.where(in_set, kept.sum(dim=-1), 1.0).unsqueeze(1)
    # Top-p off (1 or 0) must keep everything, even tokens after the cumulative sum rounds to 1: threshold 2.
    top_p = torch.tensor([p.top_p if 0 < p.top_p < 1 else 2.0 for p in params], device=dev)  # [M]
    cum = kept.cumsum(dim=-1)  # [M, K]
    before = cum - kept  # mass strictly before each token; 0 for the first, which is always kept
    complete = in_set | (cum[:, -1] >= top_p)  # the first token past K would have been removed
    return kept.masked_fill(before >= top_p.unsqueeze(1), 0.0), complete


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs: [M, V] non-negative (not necessarily normalised); u: [M] in [0, 1). Returns [M] indices i with
    P(i) proportional to probs[:, i]; never an index of probability 0."""
    cdf = probs.cumsum(dim=-1)  # [M, V]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [M, 1]
    v = probs.shape[1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(v - 1)  # first i with cdf[i] > target
    zero = probs.gather(1, idx.unsqueeze(1)).squeeze(1) == 0
    if bool(zero.any()):  # rounding put target at the total: take the last index with probability > 0
        last_positive = v - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
        idx = torch.where(zero, last_positive, idx)
    return idx
