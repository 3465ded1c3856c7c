"""The Router contract on an in-process Engine, without sockets: what the router servicer does with a StepRequest
(releases first, then the step; free, cached and own blocks in the outcome), for tests and benchmarks that drive the
real scheduler and the real engine in one process. The engine runs on the caller's thread."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from moemesh.runtime import types as runtime  # its SequenceWork/SequenceResult: the engine's side of ours
from moemesh.runtime.prefix_cache import cache_salt
from moemesh.runtime.types import CapacityError, SamplingParams
from services.batcher.step import RouterFull, RouterLimits, SequenceResult, SequenceWork, StepOutcome, StepPlan


class LocalRouter:
    def __init__(self, engine, sampling=lambda seq: SamplingParams(max_tokens=seq.max_tokens, ignore_eos=True)) -> None:
        self.engine = engine
        self.sampling = sampling  # Sequence -> runtime SamplingParams (sent once, at position 0)
        self.refusals = 0  # steps the engine refused for lack of KV blocks (the batcher over-admitted)

    async def info(self) -> RouterLimits:
        i = self.engine.info
        return RouterLimits(model=i.model, max_context=i.max_context, kv_block_size=i.kv_block_size,
                            kv_blocks_total=i.kv_blocks_total, kv_blocks_free=i.kv_blocks_free,
                            active_sequences=i.active_sequences, eos_token_ids=i.eos_token_ids, instance_id="local")

    async def release(self, seq_ids: Seq[str]) -> int:
        self.engine.release(list(seq_ids))
        return self.engine.blocks.free_blocks

    async def step(self, plan: StepPlan) -> StepOutcome:
        return self.run(plan)

    def run(self, plan: StepPlan) -> StepOutcome:
        """One step, synchronously (the scheduler's unit tests call this directly)."""
        self.engine.release(plan.release)
        works = [self._work(i) for i in plan.items]
        try:
            results = self.engine.step(works)
        except CapacityError as exc:
            self.refusals += 1
            raise RouterFull(str(exc), self.engine.blocks.free_blocks) from exc
        blocks = self.engine.blocks
        ids = blocks.take_dirty() | {w.seq_id for w in works}
        outputs = [SequenceResult(r.seq_id, r.token_id, r.logprob, r.top_logprobs, r.cached_tokens,
                                  [(e.logprob, list(e.top)) for e in r.prompt_logprobs]) for r in results]
        return StepOutcome(outputs, 0.0, blocks.free_blocks, {i: blocks.own(i) for i in ids if i in blocks},
                           blocks.cached_blocks)

    def _work(self, item: SequenceWork) -> runtime.SequenceWork:
        seq = item.seq
        first = item.position == 0
        if item.follows:  # the engine feeds the token it sampled last (the batcher may not know it yet)
            return runtime.SequenceWork(seq.seq_id, [], item.position, sampling=None, follows=True)
        return runtime.SequenceWork(seq.seq_id, item.token_ids, item.position, sample=item.sample,
                                    sampling=self.sampling(seq) if first else None,
                                    salt=cache_salt(seq.tenant, seq.cache_salt) if first else "")
