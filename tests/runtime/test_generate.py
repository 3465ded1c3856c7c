"""generate(): batching, chunked prefill, stopping, context limit, logprobs, release; on a history engine and on
the real runtime Engine with tiny random checkpoints."""

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moemesh.runtime.generate import IncrementalText, generate
from moemesh.runtime.sampling import Sampler, SeqSampleState
from moemesh.runtime.types import CapacityError, EngineInfo, SamplingParams, SequenceResult, SequenceStateError


class HistoryEngine:
    """The step protocol with a stand-in model: a sequence's logits are a fixed pseudo-random function of its whole
    token history, so any wrong position, chunk or fed token changes the output. Sampling is the real Sampler."""

    def __init__(self, vocab=40, max_context=64, eos=()):
        self.info = EngineInfo(
            model="history", architecture="toy", max_context=max_context, kv_block_size=16, kv_blocks_total=0,
            kv_blocks_free=0, active_sequences=0, vocab_size=vocab, num_layers=0, num_experts=0,
            experts_per_token=0, moe_layers=(), eos_token_ids=tuple(eos), device="cpu", dtype="float32",
        )
        self.capacity = max_context  # tokens one sequence may hold
        self.seqs = {}  # seq_id -> (token history, SeqSampleState)
        self.steps = []  # per step: [(seq_id, tokens fed, position, sample)]
        self.released = []

    def step(self, work):
        self.steps.append([(w.seq_id, len(w.token_ids), w.position, w.sample) for w in work])
        sampled, logits = [], []
        for w in work:
            if w.position == 0:
                self.seqs[w.seq_id] = ([], SeqSampleState.new(w.sampling))
            history, state = self.seqs[w.seq_id]
            if w.position != len(history):
                raise SequenceStateError(f"{w.seq_id}: position {w.position} != cached {len(history)}")
            if w.position + len(w.token_ids) > self.capacity:
                raise CapacityError(w.seq_id)
            history.extend(w.token_ids)
            if w.sample:
                g = torch.Generator().manual_seed(hash(tuple(history)) % 2**62)
                logits.append(torch.randn(self.info.vocab_size, generator=g) * 3)
                sampled.append(w)
        outs = Sampler().sample(
            torch.stack(logits) if logits else torch.zeros(0, self.info.vocab_size),
            [w.sampling for w in sampled], [self.seqs[w.seq_id][1] for w in sampled],
        )
        by_id = {w.seq_id: SequenceResult(w.seq_id, o.token_id, o.logprob, o.top_logprobs)
                 for w, o in zip(sampled, outs)}
        return [by_id.get(w.seq_id, SequenceResult(w.seq_id, None)) for w in work]

    def release(self, seq_ids):
        for seq_id in seq_ids:
            del self.seqs[seq_id]
        self.released.extend(seq_ids)


PROMPTS = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4, 3, 2, 1], [3, 3]]
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=12, presence_penalty=0.5)


def letters(ids):
    return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12), SAMPLED])
def test_batched_equals_one_at_a_time_whatever_the_schedule(params):
    alone = [generate(HistoryEngine(), [p], params)[0].token_ids for p in PROMPTS]
    for kw in ({}, {"prefill_chunk": 2}, {"max_running": 2}, {"prefill_chunk": 4, "max_running": 3}):
        engine = HistoryEngine()
        assert [c.token_ids for c in generate(engine, PROMPTS, params, **kw)] == alone, kw
        assert engine.seqs == {} and sorted(engine.released) == sorted(set(engine.released))
    assert all(len(ids) == 12 for ids in alone)


def test_schedule_prefills_together_then_decodes_together():
    engine = HistoryEngine()
    generate(engine, PROMPTS, SamplingParams(max_tokens=3), prefill_chunk=4)
    fed = [[(n, pos, sample) for _, n, pos, sample in step] for step in engine.steps]
    assert fed[0] == [(3, 0, True), (1, 0, True), (4, 0, False), (2, 0, True)]
    assert fed[1] == [(1, 3, True), (1, 1, True), (4, 4, False), (1, 2, True)]  # mixed prefill and decode
    assert fed[2] == [(1, 4, True), (1, 2, True), (1, 8, True), (1, 3, True)]
    assert len(engine.steps) == 5  # the long prompt needs 3 prefill steps, then its 2 decode steps


def test_seed_gives_the_same_output_and_different_seeds_differ():
    runs = [generate(HistoryEngine(), PROMPTS, SAMPLED) for _ in range(2)]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    other = generate(HistoryEngine(), PROMPTS, dataclasses.replace(SAMPLED, seed=12))
    assert [c.token_ids for c in other] != [c.token_ids for c in runs[0]]


def test_stop_token_ids_eos_and_ignore_eos():
    free = generate(HistoryEngine(), [PROMPTS[0]], SamplingParams(max_tokens=12))[0].token_ids
    stop_at = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    by_id = generate(HistoryEngine(), [PROMPTS[0]], SamplingParams(max_tokens=12, stop_token_ids=(free[stop_at],)))
    assert by_id[0].token_ids == free[: stop_at + 1] and by_id[0].finish_reason == "stop"
    by_eos = generate(HistoryEngine(eos=(free[stop_at],)), [PROMPTS[0]], SamplingParams(max_tokens=12))
    assert by_eos[0].token_ids == free[: stop_at + 1] and by_eos[0].finish_reason == "stop"
    ignored = generate(HistoryEngine(eos=(free[stop_at],)), [PROMPTS[0]], SamplingParams(max_tokens=12, ignore_eos=True))
    assert ignored[0].token_ids == free and ignored[0].finish_reason == "length"


def test_stop_strings_cut_the_text_and_the_stop_token_text_is_dropped():
    free = generate(HistoryEngine(), [PROMPTS[2]], SamplingParams(max_tokens=12), decode=letters)[0]
    assert free.text == letters(free.token_ids) and free.finish_reason == "length"
    stop = free.text[4:6]
    first = free.text.find(stop)
    cut = generate(HistoryEngine(), [PROMPTS[2]], SamplingParams(max_tokens=12, stop=(stop,)), decode=letters)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:first]
    assert cut.token_ids == free.token_ids[: first + 2]
    eos = free.token_ids[5]
    by_eos = generate(HistoryEngine(eos=(eos,)), [PROMPTS[2]], SamplingParams(max_tokens=12), decode=letters)[0]
    assert by_eos.text == letters(by_eos.token_ids[:-1]) and by_eos.token_ids[-1] == eos


def test_context_window_finishes_with_length():
    engine = HistoryEngine(max_context=12)
    out = generate(engine, PROMPTS, SamplingParams(max_tokens=50))
    assert [len(c.token_ids) for c in out] == [12 - len(p) for p in PROMPTS]
    assert {c.finish_reason for c in out} == {"length"}
    with pytest.raises(ValueError, match=r"prompts\[0\] has 12 tokens"):
        generate(engine, [[1] * 12], SamplingParams())


def test_logprobs_follow_the_tokens():
    params = [SamplingParams(max_tokens=5, logprobs=True, top_logprobs=3), SamplingParams(max_tokens=5)]
    out = generate(HistoryEngine(), PROMPTS[:2], params)
    assert len(out[0].logprobs) == len(out[0].top_logprobs) == 5
    for tok, lp, top in zip(out[0].token_ids, out[0].logprobs, out[0].top_logprobs):
        assert top[0] == (tok, lp)  # greedy: the chosen token is the most likely
    assert out[1].logprobs is None and out[0].prompt_tokens == 3


def test_bad_input_is_rejected_before_any_step():
    engine = HistoryEngine()
    with pytest.raises(ValueError, match="sampling.temperature"):
        generate(engine, PROMPTS, SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match=r"needs a decode"):
        generate(engine, PROMPTS, SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match=r"prompts\[1\] has 0 tokens"):
        generate(engine, [[1], []], SamplingParams())
    with pytest.raises(ValueError, match="2 entries for 4 prompts"):
        generate(engine, PROMPTS, [SamplingParams()] * 2)
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(engine, PROMPTS, SamplingParams(), prefill_chunk=0)
    assert engine.steps == []


def test_engine_failure_releases_the_running_sequences():
    engine = HistoryEngine(max_context=100)
    engine.capacity = 30  # generate believes there is room; the cache has not
    with pytest.raises(CapacityError):
        generate(engine, PROMPTS, SamplingParams(max_tokens=80))
    assert engine.seqs == {}


def byte_tokenizer():
    """One token per byte (byte-level BPE without merges): multi-byte characters span tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_incremental_text_never_shows_half_a_character():
    tok = byte_tokenizer()
    prompt, text = tok.encode("Grüße: ").ids, "naïve 世界 🙂!"
    inc = IncrementalText(tok.decode, prompt)
    deltas = [inc.push(t) for t in tok.encode(text).ids]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert deltas.count("") == 1 + 2 + 2 + 3  # waits inside ï, 世, 界, 🙂
    cut = IncrementalText(tok.decode, prompt)
    ids = tok.encode("a世").ids
    assert [cut.push(t, final=i == 1) for i, t in enumerate(ids[:2])] == ["a", "\ufffd"]  # final flushes


# ---- the real Engine on tiny random checkpoints -------------------------------------------------------------------

EOS_ID = 1
REAL_PROMPTS = [[5, 6, 7], [9], [3, 30, 60, 90, 120, 150, 180, 210, 240, 17, 40], [200, 100]]


def save_tiny(kind, path):
    """A tiny random HF checkpoint written by transformers itself (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=EOS_ID)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def tiny(request, tmp_path_factory):
    from moemesh.runtime.engine import Engine

    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny(request.param, path)
    return model, Engine.load(path)


REAL_SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=5, max_tokens=16, frequency_penalty=0.3,
                              logprobs=True, top_logprobs=2)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=16), REAL_SAMPLED])
def test_engine_batched_equals_one_at_a_time(tiny, params):
    _, engine = tiny
    alone = [generate(engine, [p], params)[0] for p in REAL_PROMPTS]
    for kw in ({}, {"prefill_chunk": 4}):
        batched = generate(engine, REAL_PROMPTS, params, **kw)
        assert [c.token_ids for c in batched] == [c.token_ids for c in alone], kw
        assert [c.finish_reason for c in batched] == [c.finish_reason for c in alone]
        if params.logprobs:
            for b, a in zip(batched, alone):
                assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert engine.info.active_sequences == 0 and engine.info.kv_blocks_free == engine.info.kv_blocks_total


def test_engine_greedy_matches_transformers(tiny):
    model, engine = tiny
    prompt = REAL_PROMPTS[2]
    ours = generate(engine, [prompt], SamplingParams(max_tokens=20))[0]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=EOS_ID)
    assert ours.token_ids == ref[0, len(prompt):].tolist()


def test_engine_seeds_max_tokens_and_stop_ids(tiny):
    _, engine = tiny
    first = generate(engine, REAL_PROMPTS, REAL_SAMPLED)
    assert [c.token_ids for c in generate(engine, REAL_PROMPTS, REAL_SAMPLED)] == [c.token_ids for c in first]
    reseeded = generate(engine, REAL_PROMPTS, dataclasses.replace(REAL_SAMPLED, seed=6))
    assert [c.token_ids for c in reseeded] != [c.token_ids for c in first]

    free = generate(engine, [REAL_PROMPTS[0]], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    assert len(free) == 12
    short = generate(engine, [REAL_PROMPTS[0]], SamplingParams(max_tokens=4))[0]
    assert short.token_ids == free[:4] and short.finish_reason == "length"
    stop = free[6]
    cut = generate(engine, [REAL_PROMPTS[0]], SamplingParams(max_tokens=12, stop_token_ids=(stop,), ignore_eos=True))
    assert cut[0].token_ids == free[: free.index(stop) + 1] and cut[0].finish_reason == "stop"


def test_engine_stop_strings_with_the_real_tokenizer(tiny_moe_dir):
    from moemesh.runtime.engine import Engine

    tok = Tokenizer.from_file(str(tiny_moe_dir / "tokenizer.json"))
    engine = Engine.load(tiny_moe_dir)
    prompt = tok.encode("The capital of France is").ids
    free = generate(engine, [prompt], SamplingParams(max_tokens=24, ignore_eos=True), decode=tok.decode)[0]
    assert free.text == tok.decode(free.token_ids)
    stop = free.text[len(free.text) // 2 :][:3]
    cut = generate(engine, [prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)), decode=tok.decode)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    assert free.token_ids[: len(cut.token_ids)] == cut.token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda(tmp_path):
    from moemesh.runtime.engine import Engine

    save_tiny("mixtral", tmp_path)
    cpu, gpu = Engine.load(tmp_path), Engine.load(tmp_path, device="cuda")
    greedy = SamplingParams(max_tokens=12)
    on_gpu = [c.token_ids for c in generate(gpu, REAL_PROMPTS, greedy, prefill_chunk=4)]
    assert on_gpu == [c.token_ids for c in generate(cpu, REAL_PROMPTS, greedy)]
    sampled = [c.token_ids for c in generate(gpu, REAL_PROMPTS, REAL_SAMPLED)]
    assert sampled == [generate(gpu, [p], REAL_SAMPLED)[0].token_ids for p in REAL_PROMPTS]
