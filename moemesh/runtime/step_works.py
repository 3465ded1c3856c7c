"""How the engine reads a step's works before running them: it fills in what later works may leave out (the sampling
parameters a sequence started with, the token it sampled last) and checks them, all before any state changes.

A work with `follows` set carries no token: it feeds the token this engine sampled for the sequence in its previous
sampling step. The batcher uses it for step pipelining: it sends step N+1 while step N still runs, before it knows
the tokens of step N (services/batcher/lookahead.py). Its position already counts that token as not yet cached,
like any decode: position == tokens cached after step N.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moemesh.runtime.sampling import SeqSampleState, validate
from moemesh.runtime.types import ContextLengthError, SamplingParams, SequenceStateError, SequenceWork


@dataclass
class SeqState:
    """What the engine keeps per sequence between steps."""

    length: int  # tokens in the KV cache
    sampling: SeqSampleState  # seeded generator + completion token counts
    params: SamplingParams  # what it started with (later works may leave sampling out)
    last_token: int | None = None  # the token sampled in its last sampling step (not in the KV cache yet)


def fill_in(works: list[SequenceWork], seqs: dict[str, SeqState]) -> list[SequenceWork]:
    """Works with their sampling parameters (None: the sequence's own) and followed token filled in. Raises
    SequenceStateError for a work that follows a sequence with no sampled token."""
    out = []
    for w in works:
        known = seqs.get(w.seq_id)
        if w.sampling is None:
            w = replace(w, sampling=known.params if known else SamplingParams())
        if w.follows:
            if known is None or known.last_token is None or w.token_ids:
                state = "is unknown" if known is None else ("sampled no token yet" if known.last_token is None
                                                            else "also lists token_ids")
                raise SequenceStateError(f"sequence {w.seq_id!r}: follows its last sampled token but it {state}")
            w = replace(w, token_ids=[known.last_token], follows=False)
        out.append(w)
    return out


def check(works: list[SequenceWork], seqs: dict[str, SeqState], vocab_size: int, max_context: int) -> None:
    """Each sequence at most once, tokens in the vocabulary, positions equal to the cached lengths, the context
    window respected, sampling parameters valid."""
    ids = [w.seq_id for w in works]
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i in set(ids) if ids.count(i) > 1)
        raise ValueError(f"a step lists each sequence at most once, got {repeated} more than once")
    for w in works:
        if not w.token_ids:
            raise ValueError(f"sequence {w.seq_id!r}: token_ids is empty")
        bad = [t for t in w.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sequence {w.seq_id!r}: token ids {bad[:5]} outside [0, {vocab_size})")
        known = seqs.get(w.seq_id)
        cached = known.length if known else 0
        if w.position != cached or (known is None and w.position != 0):
            state = f"has {cached} tokens cached" if known else "is unknown (a new sequence starts at position 0)"
            raise SequenceStateError(f"sequence {w.seq_id!r}: position {w.position} but it {state}")
        if w.position + len(w.token_ids) > max_context:
            raise ContextLengthError(f"sequence {w.seq_id!r}: {w.position + len(w.token_ids)} tokens exceed "
                                     f"max_context {max_context}")
        if known is None or (w.sampling is not known.params and w.sampling != known.params):
            validate(w.sampling)  # the params a sequence keeps were checked when it started
