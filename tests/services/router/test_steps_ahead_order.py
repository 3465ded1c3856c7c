"""The order StepsAhead (services/router/steps_ahead.py) keeps, on the CPU: which step is launched behind which, what a
job collects, what is undone when the step before fails. The engine here is a recorder of launch/finish/abort/step
calls (the real engine's launched steps are checked on the H200: test_steps_ahead.py, runtime/test_step_ahead.py)."""

from __future__ import annotations

import pytest

from moemesh.runtime.types import SequenceResult, SequenceWork
from services.router.steps_ahead import StepsAhead


class Launched:
    def __init__(self, works, after):
        self.works, self.after, self.finished = works, after, False

    @property
    def key(self):
        return [(w.seq_id, w.position) for w in self.works]

    def done(self) -> bool:
        return True  # an offer made before the job still counts (it is looked at first); none: no waiting


class Recorder:
    """Engine.launch / finish / abort / step as calls in a list; finish of the step at position `fail` raises."""

    def __init__(self, qualifies: bool = True, fail: int | None = None) -> None:
        self.calls, self.qualifies, self.fail = [], qualifies, fail

    def launch(self, works, after=None):
        self.calls.append(("launch", works[0].position, after.works[0].position if after else None))
        return Launched(works, after) if self.qualifies else None

    def finish(self, launched):
        self.calls.append(("finish", launched.works[0].position))
        if launched.works[0].position == self.fail:
            raise RuntimeError("device fault")
        return [SequenceResult(w.seq_id, 7) for w in launched.works]

    def abort(self, launched):
        self.calls.append(("abort", launched.works[0].position))

    def step(self, works):
        self.calls.append(("step", works[0].position))
        return [SequenceResult(w.seq_id, 7) for w in works]


def _works(position: int) -> list[SequenceWork]:
    return [SequenceWork("a", [], position, None, follows=True)]


def test_an_offered_step_goes_out_behind_the_running_one_and_its_job_only_collects_it():
    engine = Recorder()
    ahead = StepsAhead(engine)
    ahead.offer(2, _works(11))
    assert ahead.step(1, _works(10))[0].token_id == 7
    assert engine.calls == [("launch", 10, None), ("launch", 11, 10), ("finish", 10)]
    engine.calls.clear()
    ahead.step(2, _works(11))  # nothing offered for step 3 by the time step 2 is done: it collects step 2
    assert engine.calls == [("finish", 11)]


def test_when_the_running_step_fails_the_one_behind_it_is_undone():
    engine = Recorder(fail=10)
    ahead = StepsAhead(engine)
    ahead.offer(2, _works(11))
    with pytest.raises(RuntimeError, match="device fault"):
        ahead.step(1, _works(10))
    assert engine.calls[-1] == ("abort", 11)
    engine.calls.clear()
    ahead.step(2, _works(11))  # its own job: launched afresh, not the undone one
    assert engine.calls[0] == ("launch", 11, None)


def test_a_launch_under_another_steps_id_is_not_claimed():
    engine = Recorder()
    ahead = StepsAhead(engine)
    ahead.offer(2, _works(11))
    ahead.step(1, _works(10))
    engine.calls.clear()
    ahead.step(2, _works(50))  # a restarted batcher reusing the id: not what was launched
    assert engine.calls[0] == ("launch", 50, None)
    ahead.step(9, _works(60))  # stale entries of ids below the current one are dropped
    assert not ahead._launched


def test_steps_that_do_not_qualify_or_steps_ahead_off_run_engine_step():
    engine = Recorder(qualifies=False)
    StepsAhead(engine).step(1, _works(10))
    assert engine.calls == [("launch", 10, None), ("step", 10)]
    engine = Recorder()
    off = StepsAhead(engine, enabled=False)
    off.offer(2, _works(11))
    off.step(1, _works(10))
    assert engine.calls == [("step", 10)]
