"""Launching a decode step before the previous one's tokens have reached the host, so the GPU never waits for it.

    engine thread:  launch(N) .. launch(N+1, after=N) .. finish(N) -> results N  |  finish(N+1) -> results N+1 ..
    device stream:  [ replay N | sample N | copy N ][ index_select N's tokens | replay N+1 | sample N+1 | ... ]

`launch` does all of a step's host work (checks, KV block reservation, staging) and queues its device work: the
decode graph's replay, sampling, and one device-to-host copy of the sampled tokens into pinned memory, then an event.
It does not wait. `finish` waits on the event and applies the results (sampling states, KV commits, each sequence's
last token). A work that follows a sequence of a step still in flight takes its token on the device, from that
step's sampled tokens (DecodeRunner.run's `fed`), so the host prepares step N+1 while the GPU runs step N: the host
time of a step (~1.5 ms at 64 sequences on the H200, more under a busy event loop) leaves the critical path. This is
the overlap scheduling of SGLang and vLLM's async scheduling, fed by the batcher's pipelined steps (lookahead.py).

Only plain decode steps qualify (`launch` returns None otherwise, and the caller runs Engine.step): one token per
known sequence, sampling without penalties, grammar or logprobs, the decode runner's buckets, an in-process expert
dispatch (Dispatch.steps_ahead), no ping-pong split. Engine.step and Engine.release first finish every launched step
(`settle`), so the two paths mix freely; a launched step's results wait in it until its own finish() call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from moemesh.runtime.sampling import SeqSampleState, wants_logprobs
from moemesh.runtime.step_works import SeqState, check, fill_in
from moemesh.runtime.types import SamplingParams, SequenceResult, SequenceWork


@dataclass
class Launched:
    """A step whose device work is queued; its results come from finish()."""

    works: list[SequenceWork]  # filled in; a device-fed work carries token 0 as a placeholder
    states: list[SeqSampleState]
    before: list[SeqState]  # each sequence's state before the launch (abort restores it)
    tokens: torch.Tensor  # [N] int64 sampled tokens, on the device
    host: torch.Tensor  # [N] int64 pinned copy of `tokens` (valid once `event` completed)
    event: torch.cuda.Event | None
    fed: dict[int, int]  # work index -> index into after's tokens, for works fed on the device
    after: Launched | None
    index: dict[str, int] = field(default_factory=dict)  # seq_id -> work index
    token_list: list[int] | None = None  # set by finish
    results: list[SequenceResult] | None = None  # set by finish

    @property
    def key(self) -> list[tuple[str, int]]:
        """(sequence, position) of each work: a later request must match it to claim these results."""
        return [(w.seq_id, w.position) for w in self.works]

    def done(self) -> bool:
        return self.event is None or self.event.query()


def plain(params: SamplingParams) -> bool:
    """Sampling that needs nothing from the host between steps (no penalties over counts, grammar or logprobs)."""
    return (params.presence_penalty == 0 and params.frequency_penalty == 0 and params.repetition_penalty == 1.0
            and params.guided is None and not wants_logprobs(params) and params.prompt_logprobs is None)


def launch(engine, works: list[SequenceWork], after: Launched | None = None) -> Launched | None:
    """Queues one plain decode step (see the module doc); None when the step does not qualify. CapacityError and
    SequenceStateError as Engine.step, with nothing changed."""
    if after is None:
        settle(engine)
    elif engine.pending != [after]:
        return None
    works = _filled(engine, works, after)
    if works is None:
        return None
    fed = {i: after.index[w.seq_id] for i, w in enumerate(works) if after is not None and w.follows}
    works = [replace(w, token_ids=[0], follows=False) if i in fed else w for i, w in enumerate(works)]
    if not engine.decode.takes(works):
        return None
    check(works, engine._seqs, engine.spec.vocab_size, engine.max_context)
    engine._reserve(works)  # CapacityError: nothing changed (a decode token never comes from the prefix cache)
    before = [engine._seqs[w.seq_id] for w in works]
    states = [s.sampling for s in before]
    try:
        for i, (w, state) in enumerate(zip(works, states)):
            if i not in fed:  # a device-fed token was observed by finish(after) already
                state.fed(w.token_ids, w.position, w.sampling.prompt_tokens)
        tokens, host, event = _queue(engine, works, states, fed, after)
    except BaseException:
        for w in works:
            engine.blocks.truncate(w.seq_id, w.position)
        raise
    for w, state in zip(works, states):
        engine._seqs[w.seq_id] = SeqState(w.position + 1, state, w.sampling, None)
    launched = Launched(works, states, before, tokens, host, event, fed, after,
                        {w.seq_id: i for i, w in enumerate(works)})
    engine.pending.append(launched)
    return launched


def _filled(engine, works: list[SequenceWork], after: Launched | None) -> list[SequenceWork] | None:
    """The works with sampling filled in (follows kept where `after` feeds them), or None if the step does not
    qualify."""
    if (engine.decode is None or not getattr(engine.dispatch, "steps_ahead", False) or not works
            or (engine.micro is not None and engine.micro.split_at([1] * len(works)) is not None)):
        return None
    seqs, out = engine._seqs, []
    for w in works:
        known = seqs.get(w.seq_id)
        in_flight = after is not None and w.seq_id in after.index
        if known is None or not w.sample or (not w.follows and len(w.token_ids) != 1) or (w.follows and w.token_ids):
            return None
        if w.follows and not in_flight:
            w = fill_in([w], seqs)[0]  # its token is on the host already
        elif w.sampling is None:
            w = replace(w, sampling=known.params)
        if not plain(w.sampling or known.params):
            return None
        out.append(w)
    return out


def _queue(engine, works: list[SequenceWork], states: list[SeqSampleState], fed: dict[int, int],
           after: Launched | None) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
    """The step's device work: decode (tokens fed from `after` on the device), sampling, the copy to pinned memory."""
    source = None
    if fed:
        rows = sorted(fed)
        source = (after.tokens, torch.tensor([fed[i] for i in rows]), torch.tensor(rows))
    with torch.inference_mode():
        logits = engine._decode(works, fed=source)  # [N, V] float32
        tokens = engine.sampler.draw(logits, [w.sampling for w in works], states)[0]  # [N] int64
    cuda = tokens.device.type == "cuda"
    host = torch.empty(len(works), dtype=torch.int64, pin_memory=cuda)
    host.copy_(tokens, non_blocking=cuda)
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    return tokens, host, event


def finish(engine, launched: Launched) -> list[SequenceResult]:
    """Waits for a launched step (one device-to-host copy) and applies it; returns its results in work order."""
    if launched.results is not None:  # settled earlier (Engine.step or release ran in between)
        return launched.results
    if launched.after is not None and launched.after.results is None:
        finish(engine, launched.after)
    if launched.event is not None:
        launched.event.synchronize()
    # host: the pinned CPU tensor the step's one device-to-host copy filled (waited for by the event above), so
    # this reads host memory and stalls nothing: the one .tolist() of a step, not of a layer
    launched.token_list = launched.host.tolist()
    results = []
    for i, (w, state, token) in enumerate(zip(launched.works, launched.states, launched.token_list)):
        state.observe(token)
        fed_token = launched.after.token_list[launched.fed[i]] if i in launched.fed else w.token_ids[0]
        engine.blocks.commit(w.seq_id, [fed_token])  # K/V written: full blocks become shareable
        engine._seqs[w.seq_id].last_token = token
        results.append(SequenceResult(w.seq_id, token))
    engine.pending.remove(launched)
    launched.results = results
    return results


def abort(engine, launched: Launched) -> None:
    """Undoes a launched step that has not finished (the step it followed failed): KV blocks and sequence states
    as before the launch. Its device work still runs; it writes only rows the rolled-back positions own."""
    if launched.results is not None or launched not in engine.pending:
        return
    for w, before in zip(launched.works, launched.before):
        engine.blocks.truncate(w.seq_id, w.position)
        engine._seqs[w.seq_id] = before
    engine.pending.remove(launched)


def settle(engine) -> None:
    """Finishes every launched step, oldest first (before anything else changes the engine's state)."""
    while engine.pending:
        finish(engine, engine.pending[0])
