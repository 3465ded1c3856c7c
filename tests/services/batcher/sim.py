"""A deterministic stand-in for the router in scheduler unit tests: it checks every SequenceWork against its own KV
ledger (positions must match, capacity must hold, as the real router enforces) and samples token = position-derived
ids, so tests exercise the scheduler, not this file."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.batcher.kv_view import KvView
from services.batcher.policy import Policy
from services.batcher.scheduler import Scheduler
from services.batcher.sequence import Sequence
from services.batcher.step import Event, SequenceResult, StepOutcome, StepPlan


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class SimRouter:
    block_size: int
    total_blocks: int
    cached: dict[str, int] = field(default_factory=dict)
    eos: int | None = None  # sample this token at the given output index (see eos_after)
    eos_after: dict[str, int] = field(default_factory=dict)
    steps: list[StepPlan] = field(default_factory=list)

    def used(self) -> int:
        return sum(-(-n // self.block_size) for n in self.cached.values())

    def release(self, ids: list[str]) -> None:
        for i in ids:
            self.cached.pop(i, None)

    def step(self, plan: StepPlan, step_seconds: float = 0.01) -> StepOutcome:
        self.release(plan.release)
        after = dict(self.cached)
        outs = []
        for item in plan.items:
            have = after.get(item.seq.seq_id, 0)
            assert item.position == have, f"{item.seq.seq_id}: position {item.position} != cached {have}"
            after[item.seq.seq_id] = have + len(item.token_ids)
            token = None
            if item.sample:
                n_out = len(item.seq.output_ids)
                token = self.eos if self.eos_after.get(item.seq.seq_id) == n_out else 1000 + n_out
            outs.append(SequenceResult(item.seq.seq_id, token))
        need = sum(-(-n // self.block_size) for n in after.values())
        assert need <= self.total_blocks, f"KV overflow: {need} > {self.total_blocks}"
        self.cached = after
        self.steps.append(plan)
        own = {i.seq.seq_id: -(-after[i.seq.seq_id] // self.block_size) for i in plan.items}  # nothing shared here
        return StepOutcome(outs, step_seconds, self.total_blocks - self.used(), own)


def make(
    clock: Clock | None = None, block_size: int = 16, total_blocks: int = 1000, max_context: int = 4096, eos=(),
    **policy,
) -> tuple[Scheduler, SimRouter, Clock]:
    clock = clock or Clock()
    policy.setdefault("max_wait", 0.0)
    sched = Scheduler(Policy(**policy), KvView(block_size, total_blocks), max_context, eos, clock)
    return sched, SimRouter(block_size, total_blocks), clock


def seq(seq_id: str, prompt_len: int = 4, max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_ids=list(range(1, prompt_len + 1)), max_tokens=max_tokens, **kw)


def run_step(sched: Scheduler, router: SimRouter, clock: Clock, dt: float = 0.01) -> tuple[StepPlan | None, list[Event]]:
    """One engine-loop turn: schedule, release + step in the router, complete; advances the clock by dt."""
    plan = sched.schedule()
    if plan is None:
        router.release(sched.take_releases())
        clock.advance(dt)
        return None, sched.take_events()
    clock.advance(dt)
    sched.complete(plan, router.step(plan, dt))
    return plan, sched.take_events()


def run_until_idle(sched, router, clock, limit: int = 10_000) -> list[Event]:
    events = []
    for _ in range(limit):
        if not sched.running and not len(sched.queue):
            router.release(sched.take_releases())
            return events + sched.take_events()
        events += run_step(sched, router, clock)[1]
    raise AssertionError("scheduler did not drain")


def ids(plan: StepPlan) -> list[str]:
    return [i.seq.seq_id for i in plan.items]


def finals(events: list[Event]) -> dict[str, Event]:
    return {e.seq_id: e for e in events if e.finish is not None}
