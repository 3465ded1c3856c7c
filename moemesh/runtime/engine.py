"""The step engine the router serves: backbone + expert dispatch + paged KV cache + sampling.

`step` runs one batch step over sequences in any mix of states (new prompts, prefill chunks, decode tokens),
atomically: it validates and reserves KV blocks before touching anything (CapacityError / SequenceStateError leave
the engine as it was), and a failure during the forward (e.g. an expert shard down) rolls the step back.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from moemesh.runtime import step_ahead
from moemesh.runtime.backbone import Backbone
from moemesh.runtime.block_manager import BlockManager
from moemesh.runtime.engine_loader import as_dtype, load_engine  # noqa: F401 (as_dtype: services import it here)
from moemesh.runtime.kv_cache import FP8, KVCache
from moemesh.runtime.micro_batch import stepping
from moemesh.runtime.prompt_logprobs import PromptScorer, logit_rows, scored_works
from moemesh.runtime.sampling import Sampler, SeqSampleState
from moemesh.runtime.spec import ModelSpec
from moemesh.runtime.step_context import StepContext
from moemesh.runtime.step_works import SeqState, check, fill_in
from moemesh.runtime.types import ContextLengthError, EngineInfo, ExpertDispatch, Guided, SequenceResult, SequenceWork

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, spec: ModelSpec, backbone: Backbone, dispatch: ExpertDispatch, cache: KVCache,
                 blocks: BlockManager, *, max_context: int, model_name: str, device: torch.device,
                 decode=None, cuda_graphs: str = "off: not a CUDA engine", quantization: str = "none") -> None:
        self.spec, self.backbone, self.dispatch = spec, backbone, dispatch
        self.cache, self.blocks = cache, blocks
        self.max_context, self.model_name, self.device = max_context, model_name, device
        self.dtype = backbone.embed.dtype
        self.sampler = Sampler()
        self._seqs: dict[str, SeqState] = {}
        self.decode, self.cuda_graphs = decode, cuda_graphs  # gpu/decode_graphs.DecodeRunner or None, and why
        self.quantization = quantization
        self.backend = "torch"  # Engine.load sets the one it built with
        self.model_dir: Path | None = None  # where the tokenizer lives (grammars need its vocabulary)
        self.grammars = None  # runtime/grammar.GrammarBook, built on the first constrained request
        self.prompts = PromptScorer()  # prompt logprobs (prompt_logprobs.py): tails between prefill chunks
        self.micro = None  # micro_batch.MicroBatching: ping-pong halves of large steps (the router sets it)
        self.pending: list = []  # step_ahead.Launched steps not finished yet, oldest first

    @classmethod
    def load(cls, model_dir: str | Path, *, dispatch: ExpertDispatch | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | str = torch.float32, kv_blocks: int | None = None, kv_memory_bytes: int | None = None,
             block_size: int = 16, max_context: int | None = None, model_name: str | None = None,
             load_format: str = "auto", cuda_graphs: bool = True, quantization: str = "none",
             backend: str = "torch", prefix_cache: bool = True, kv_cache_dtype: str = "auto") -> Engine:
        """dispatch None: every routed expert in process. KV capacity: kv_blocks, else the blocks kv_memory_bytes
        buys (default: engine_loader.DEFAULT_KV_BYTES). max_context defaults to the model's and is capped by the
        capacity. load_format "dummy": random weights from config.json alone (dummy.py). cuda_graphs: capture decode
        steps on CUDA where possible (EngineInfo.cuda_graphs says what happened). quantization none/fp8/int8/int4:
        weight-only quantized routed experts in process (a given dispatch quantizes its own), or the FFN of a dense
        model.
        backend onnxruntime: dense layers and in-process experts on ONNX Runtime int4/int8 (runtime/ort/).
        prefix_cache: share the K/V of full blocks of equal prefixes (same salt) between sequences.
        kv_cache_dtype auto (the model's dtype) or fp8: e4m3 K/V, twice the tokens per byte (kv_cache.py)."""
        return load_engine(cls, model_dir, dispatch=dispatch, device=device, dtype=dtype, kv_blocks=kv_blocks,
                           kv_memory_bytes=kv_memory_bytes, block_size=block_size, max_context=max_context,
                           model_name=model_name, load_format=load_format, cuda_graphs=cuda_graphs,
                           quantization=quantization, backend=backend, prefix_cache=prefix_cache,
                           kv_cache_dtype=kv_cache_dtype)

    # ---- stepping -------------------------------------------------------------------------------------------

    def step(self, works: list[SequenceWork]) -> list[SequenceResult]:
        """Run one step; results in work order (token_id None where the work did not sample)."""
        return self.step_with_logits(works)[0]

    def launch(self, works: list[SequenceWork], after=None):
        """step() split in two for plain decode steps: queue the step's device work without waiting (after: the
        launched step whose tokens the follows works take, still on the device). None: does not qualify, use
        step(). See step_ahead.py."""
        return step_ahead.launch(self, works, after)

    def finish(self, launched) -> list[SequenceResult]:
        """The results of a launched step (waits for its device work)."""
        return step_ahead.finish(self, launched)

    def abort(self, launched) -> None:
        """Undo a launched step that has not finished (the step it followed failed)."""
        step_ahead.abort(self, launched)

    def step_with_logits(self, works: list[SequenceWork]) -> tuple[list[SequenceResult], torch.Tensor]:
        """step(), also returning the raw logits [N, V] float32 the sampler saw, one row per sampling work in
        work order (for evaluation and parity checks)."""
        if not works:
            return [], torch.empty(0, self.spec.vocab_size)
        step_ahead.settle(self)  # launched steps first: their state is what this step builds on
        works = fill_in(works, self._seqs)  # sampling parameters and followed tokens (step_works.py)
        check(works, self._seqs, self.spec.vocab_size, self.max_context)
        scored = self._scored(works)  # works whose prompt tokens are scored (prompt_logprobs.py)
        hits = self._reserve(works, scored)  # CapacityError: no change
        try:
            states = [self._seqs[w.seq_id].sampling if w.position else SeqSampleState.new(w.sampling, self.device)
                      for w in works]
            for w, state in zip(works, states):
                if w.position == 0 and w.sampling.guided is not None:
                    state.grammar = self._grammar(w.sampling)
                state.fed(w.token_ids, w.position, w.sampling.prompt_tokens)
            with torch.inference_mode():
                logits, prompt_rows = self._forward(self._uncached(works, hits), scored)  # [N, V]: sampling works
            results = self._sample(works, states, logits)
            self._score_prompts(works, results, prompt_rows, scored)
        except BaseException:
            for w in works:  # give back the blocks this step took; new sequences disappear
                self.blocks.truncate(w.seq_id, w.position)
            raise
        for w, state, result in zip(works, states, results):
            last = result.token_id if w.sample else None
            self._seqs[w.seq_id] = SeqState(w.position + len(w.token_ids), state, w.sampling, last)
            self.blocks.commit(w.seq_id, w.token_ids)  # K/V written: full blocks become shareable
            result.cached_tokens = hits[w.seq_id]
        return results, logits

    def _reserve(self, works: list[SequenceWork], scored: dict[str, int] | None = None) -> dict[str, int]:
        """Adopts cached prefix blocks, then reserves blocks for the rest; returns the tokens hit per sequence.
        A sampling work keeps at least its last token to compute (its logits are needed); a scored one all."""
        hits = {}
        try:
            for w in works:
                limit = 0 if w.seq_id in (scored or {}) else len(w.token_ids) - (1 if w.sample else 0)
                hits[w.seq_id] = self.blocks.match(w.seq_id, w.salt, w.position, w.token_ids, limit)
            self.blocks.reserve({w.seq_id: w.position + len(w.token_ids) for w in works})
        except BaseException:
            for w in works:
                self.blocks.truncate(w.seq_id, w.position)
            raise
        return hits

    @staticmethod
    def _uncached(works: list[SequenceWork], hits: dict[str, int]) -> list[SequenceWork]:
        """What the forward computes: each work without its cached head; fully cached chunks that do not sample
        drop out (sampling works always keep a token, so logits rows stay one per sampling work)."""
        out = []
        for w in works:
            h = hits[w.seq_id]
            if h < len(w.token_ids):
                out.append(w if h == 0 else replace(w, token_ids=w.token_ids[h:], position=w.position + h))
        return out

    def _grammar(self, params):
        """The grammar state of a constrained sequence (the book is built on first use: ~0.6 s)."""
        from moemesh.runtime.grammar import GrammarBook, GrammarError

        if self.grammars is None:
            self.grammars = GrammarBook(self.model_dir, self.spec.vocab_size, self.spec.eos_token_ids)
        try:
            return self.grammars.sequence(params.guided, params.max_tokens)
        except GrammarError as exc:  # the gateway checked the schema; never fail the whole batch's step for one
            log.warning("%s; falling back to any JSON object", exc)
            return self.grammars.sequence(Guided(json_object=True), params.max_tokens)

    def _forward(self, works: list[SequenceWork],
                 scored: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits [N, V] of the sampling works' last rows, and of every row [L, V] of each scored work."""
        if not works:  # every work was a cached chunk
            return torch.empty(0, self.spec.vocab_size, device=self.device), {}
        new = [len(w.token_ids) for w in works]
        split = self.micro.split_at(new) if self.micro is not None else None  # ping-pong halves (micro_batch.py)
        if not scored and self.decode is not None and self.decode.takes(works):
            return self._decode(works, split is not None), {}
        tables = [self.blocks.table(w.seq_id) for w in works]
        tokens = torch.tensor([t for w in works for t in w.token_ids], dtype=torch.int64, device=self.device)
        rows, sampled, spans = logit_rows(works, new, scored or {})
        if split is not None:
            logits = self.micro.forward(self.backbone, self.dispatch, tokens, [w.position for w in works], new,
                                        tables, self.blocks.block_size, self.cache.pools, rows, split)
        else:
            ctx = StepContext.build([w.position for w in works], new, tables, self.blocks.block_size, self.device)
            with stepping([(self.dispatch, len(tokens))]):
                logits = self.backbone(tokens, ctx, self.dispatch, self.cache.pools, rows.to(self.device))
        if not spans:
            return logits, {}
        return logits[sampled], {seq_id: logits[a:b] for seq_id, (a, b) in spans.items()}

    def _scored(self, works: list[SequenceWork]) -> dict[str, int]:
        """Sequence -> prompt end, for works feeding prompt tokens that asked for logprobs (read before this step
        changes any state: a sequence that sampled before has no prompt left unless prompt_tokens says so)."""
        return scored_works(works, lambda i: i in self._seqs and bool(self._seqs[i].sampling.replayed))

    def _score_prompts(self, works: list[SequenceWork], results: list[SequenceResult],
                       rows: dict[str, torch.Tensor], scored: dict[str, int]) -> None:
        for w, result in zip(works, results):
            if w.seq_id in rows:
                result.prompt_logprobs = self.prompts.score(w, rows[w.seq_id], scored[w.seq_id])

    def _decode(self, works: list[SequenceWork], split: bool = False, fed=None) -> torch.Tensor:
        """A small step (decode tokens, short prefill chunks) through the paged runner, one row per token (CUDA
        graphs where captured); logits [N, V] float32 of the sampling works' last rows. split: two ping-pong
        halves of the bucket's rows, the second on self.micro.second (micro_batch.py). fed: tokens taken on the
        device (DecodeRunner.run; one-token works only)."""
        tokens, positions, tables, keep = [], [], [], []
        for w in works:
            table = self.blocks.table(w.seq_id)
            tokens.extend(w.token_ids)
            positions.extend(range(w.position, w.position + len(w.token_ids)))
            tables.extend([table] * len(w.token_ids))
            if w.sample:
                keep.append(len(tokens) - 1)
        rows, second = self.decode.rows_for(len(tokens)), self.micro.second if split else None
        parts = [(self.dispatch, rows // 2), (second, rows - rows // 2)] if split else [(self.dispatch, rows)]
        with stepping(parts):
            return self.decode.run(tokens, positions, tables, keep, second, fed)

    def _sample(self, works: list[SequenceWork], states: list[SeqSampleState],
                logits: torch.Tensor) -> list[SequenceResult]:
        picked = [i for i, w in enumerate(works) if w.sample]
        outs = []
        if picked:
            outs = self.sampler.sample(logits, [works[i].sampling for i in picked], [states[i] for i in picked])
        results = [SequenceResult(w.seq_id, None) for w in works]
        for i, out in zip(picked, outs):
            results[i] = SequenceResult(works[i].seq_id, out.token_id, out.logprob, list(out.top_logprobs))
        return results

    def release(self, seq_ids: list[str]) -> int:
        """Drop sequences and free their KV blocks; unknown ids are ignored. Returns how many were known."""
        step_ahead.settle(self)
        released = 0
        for seq_id in seq_ids:
            self.prompts.forget(seq_id)
            if self._seqs.pop(seq_id, None) is not None:
                self.blocks.free(seq_id)
                released += 1
        return released

    def cached_length(self, seq_id: str) -> int | None:
        seq = self._seqs.get(seq_id)
        return seq.length if seq else None

    # ---- scoring and info -----------------------------------------------------------------------------------

    def forward_logits(self, token_ids_batch: list[list[int]]) -> list[torch.Tensor]:
        """Logits [L_i, V] float32 at every position of each sequence (perplexity/eval); the KV cache is untouched."""
        if not token_ids_batch or any(not ids for ids in token_ids_batch):
            raise ValueError("forward_logits needs one or more non-empty token id lists")
        longest = max(len(ids) for ids in token_ids_batch)
        if longest > self.spec.max_context:
            raise ContextLengthError(f"{longest} tokens exceed the model's context {self.spec.max_context}")
        lengths = [len(ids) for ids in token_ids_batch]
        ctx = StepContext.build([0] * len(lengths), lengths, None, self.blocks.block_size, self.device)
        ctx.kv_dtype = self.cache.dtype if self.cache.dtype != self.dtype else None  # score as the cache would hold
        tokens = torch.tensor([t for ids in token_ids_batch for t in ids], dtype=torch.int64, device=self.device)
        self.dispatch.begin_step(len(tokens))
        try:
            with torch.inference_mode():
                logits = self.backbone(tokens, ctx, self.dispatch)  # [sum L, V]
        finally:
            self.dispatch.end_step()
        return list(logits.split(lengths))

    @property
    def info(self) -> EngineInfo:
        s = self.spec
        return EngineInfo(
            model=self.model_name, architecture=s.architecture, max_context=self.max_context,
            kv_block_size=self.blocks.block_size, kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.free_blocks, active_sequences=len(self._seqs), vocab_size=s.vocab_size,
            num_layers=s.num_layers, num_experts=s.num_experts, experts_per_token=s.moe.top_k if s.moe else 0,
            moe_layers=s.moe_layers, eos_token_ids=s.eos_token_ids, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), cuda_graphs=self.cuda_graphs, quantization=self.quantization,
            backend=self.backend,
            prefix_cache=self.blocks.prefix_cache, kv_blocks_cached=self.blocks.cached_blocks,
            kv_blocks_evicted=self.blocks.index.evictions, kv_cache_dtype=self.kv_cache_dtype,
        )

    @property
    def kv_cache_dtype(self) -> str:
        """The pools' dtype by name: "fp8" (e4m3) or the model's dtype."""
        return "fp8" if self.cache.dtype == FP8 else str(self.cache.dtype).removeprefix("torch.")
