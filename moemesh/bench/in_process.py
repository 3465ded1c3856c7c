"""The benchmark's load on runtime.engine.Engine in this process, for the mesh/in-process ratio (imports torch).

Continuous batching as the batcher does it, minus the network: every step carries each running sequence's prompt
(its first step) or last token; finished sequences leave after the step that finished them and waiting requests
join at once, up to `concurrency` sequences. Arrivals follow the client loop's rules (load.py): closed loop, or
Poisson arrivals that wait for a free slot; a request's clock starts at max(its arrival, when its slot freed), the
moment a client of the mesh would have sent it. Every token is its own "chunk" (TTFT = the prefill step's end).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from moemesh.bench.load import Clock
from moemesh.bench.stats import RequestRecord
from moemesh.bench.workload import LoadSpec, poisson_offsets, synthetic_prompt
from moemesh.runtime.stopping import StopChecker
from moemesh.runtime.types import SamplingParams, SequenceWork

PromptIds = Callable[[str], list[int]]  # prompt text -> token ids (chat template applied)


@dataclass
class _Seq:
    seq_id: str
    prompt: list[int]
    record: RequestRecord
    checker: StopChecker
    position: int = 0  # tokens in the KV cache
    last: int | None = None  # last sampled token

    def work(self, sampling: SamplingParams) -> SequenceWork:
        if self.last is None:
            return SequenceWork(self.seq_id, self.prompt, 0, sampling)
        return SequenceWork(self.seq_id, [self.last], self.position, sampling)


class InProcessRun:
    def __init__(self, engine, prompt_ids: PromptIds, spec: LoadSpec,
                 on_done: Callable[[RequestRecord], None] | None = None, clock: Clock = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.engine, self.prompt_ids, self.spec, self.clock, self.sleep = engine, prompt_ids, spec, clock, sleep
        self.on_done = on_done or (lambda record: None)
        self.sampling = SamplingParams(temperature=spec.temperature, max_tokens=spec.max_tokens,
                                       ignore_eos=spec.ignore_eos, seed=spec.seed if spec.temperature else None)
        info = engine.info  # once: the property builds a new dataclass per call
        self._eos, self._max_context = info.eos_token_ids, info.max_context
        self.records: list[RequestRecord] = []
        self.running: list[_Seq] = []
        self._sent = 0
        self._start = 0.0
        self._free_since: list[float] = []  # per free slot: when it became free
        self._arrivals = None if spec.rate is None else poisson_offsets(spec.rate, spec.seed)
        self._next_arrival: float | None = None  # absolute time of the next Poisson arrival

    def run(self) -> tuple[list[RequestRecord], float]:
        """(one record per request, wall seconds from the start to the last request's end)."""
        self._start = self.clock()
        self._free_since = [self._start] * self.spec.concurrency
        if self._arrivals is not None:
            self._next_arrival = self._start + next(self._arrivals)
        while True:
            self._admit()
            if not self.running:
                wait = self._wait_for_arrival()
                if wait is None:
                    break
                self.sleep(wait)
                continue
            self._step()
        return self.records, self.clock() - self._start

    def _admit(self) -> None:
        now = self.clock()
        while self._free_since and self._may_send(now):
            arrival = self._start if self._arrivals is None else self._pop_arrival()
            freed = self._free_since.pop(0)  # the longest-free slot
            self._start_request(max(arrival, freed))

    def _may_send(self, now: float) -> bool:
        if self._arrivals is None:
            return self.spec.more(self._sent, now - self._start)
        due = self._next_arrival is not None and self._next_arrival <= now
        return due and self.spec.more(self._sent, now - self._start)  # as load.py: none sent after the duration

    def _pop_arrival(self) -> float:
        arrival = self._next_arrival
        self._next_arrival = self._start + next(self._arrivals)
        return arrival

    def _wait_for_arrival(self) -> float | None:
        """Seconds until the next Poisson arrival that may still be sent; None when no request remains."""
        if self._arrivals is None or not self.spec.more(self._sent, self._next_arrival - self._start):
            return None
        return max(0.0, self._next_arrival - self.clock())

    def _start_request(self, start: float) -> None:
        index = self._sent
        self._sent += 1
        record = RequestRecord(start=start)
        prompt = self.prompt_ids(synthetic_prompt(index, self.spec.prompt_tokens, self.spec.seed))
        record.prompt_tokens = len(prompt)
        self.records.append(record)
        checker = StopChecker(self.sampling, self._eos)
        self.running.append(_Seq(f"bench-{index}", prompt, record, checker))

    def _step(self) -> None:
        works = [seq.work(self.sampling) for seq in self.running]
        try:
            results = self.engine.step(works)
        except Exception as exc:  # the engine rolled the step back: its sequences fail, the run goes on
            now = self.clock()
            for seq in self.running:
                seq.record.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            self._finish(list(self.running), now)
            return
        now = self.clock()
        finished = [seq for seq, work, result in zip(self.running, works, results)
                    if self._accept(seq, work, result.token_id, now)]
        self._finish(finished, now)

    def _accept(self, seq: _Seq, work: SequenceWork, token: int, now: float) -> bool:
        """Record one sampled token; True when the sequence finished with it."""
        seq.position += len(work.token_ids)
        seq.last = token
        seq.record.chunk_times.append(now)
        seq.record.output_tokens += 1
        decision = seq.checker.step(token)
        full = seq.position + 1 >= self._max_context  # no room for the next token
        return decision.finished or full

    def _finish(self, finished: list[_Seq], now: float) -> None:
        if not finished:
            return
        self.engine.release([seq.seq_id for seq in finished])
        for seq in finished:
            seq.record.end = now
            self.running.remove(seq)
            self._free_since.append(now)
            self.on_done(seq.record)


def kv_blocks_for(spec: LoadSpec, longest_prompt: int, block_size: int = 16) -> int:
    """KV blocks for `concurrency` sequences of the longest prompt plus max_tokens (no CapacityError mid-run)."""
    per_sequence = math.ceil((longest_prompt + spec.max_tokens + 1) / block_size)
    return spec.concurrency * per_sequence


def load_engine(model: str, spec: LoadSpec, *, device: str, dtype: str,
                kv_cache_dtype: str = "auto") -> tuple[object, PromptIds]:
    """(Engine with KV for the whole load, prompt text -> ids through the model's chat template, as the mesh's
    tokenizer service renders a one-message conversation)."""
    from moemesh.models.registry import resolve_model
    from moemesh.runtime.engine import Engine
    from moemesh.tokenization.chat_tokenizer import ChatTokenizer

    model_dir = resolve_model(model)
    tokenizer = ChatTokenizer.load(model_dir)

    def prompt_ids(text: str) -> list[int]:
        return tokenizer.encode_chat([{"role": "user", "content": text}])[0]

    longest = max(len(prompt_ids(synthetic_prompt(i, spec.prompt_tokens, spec.seed))) for i in range(8))
    blocks = kv_blocks_for(spec, longest + spec.prompt_tokens // 4 + 8)  # margin: later prompts may be longer
    engine = Engine.load(model_dir, device=device, dtype=dtype, kv_blocks=blocks, model_name=model,
                         kv_cache_dtype=kv_cache_dtype)
    return engine, prompt_ids
