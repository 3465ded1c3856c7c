"""StopChecker: stop tokens, eos, max_tokens, stop strings across tokens, and the held-back tail."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.runtime.stopping import StopChecker
from moemesh.runtime.types import SamplingParams

EOS = 2


def run(checker, deltas, token=7):
    """Feed deltas as tokens until the checker stops; returns (emitted deltas, finish reason)."""
    emitted = []
    for delta in deltas:
        decision = checker.step(token, delta)
        emitted.append(decision.text)
        if decision.finished:
            return emitted, decision.finish_reason
    return emitted, None


def checker(**kw):
    return StopChecker(SamplingParams(**{"max_tokens": 100, **kw}), eos_token_ids=(EOS,))


def test_stop_string_straddling_tokens_is_cut_and_never_shown():
    c = checker(stop=("###",))
    emitted, reason = run(c, ["ab#", "#", "#cd"])
    assert emitted == ["ab", "", ""]
    assert reason == "stop" and c.text == "ab"


def test_held_tail_is_released_when_it_cannot_start_a_stop_string():
    c = checker(stop=("###",))
    emitted, reason = run(c, ["ab#", "#", "x", "y"])
    assert emitted == ["ab", "", "##x", "y"]
    assert reason is None and c.text == "ab##xy"


def test_hold_back_only_the_matching_tail():
    c = checker(stop=("END", "<|im"))
    assert run(c, ["the E"])[0] == ["the "]
    assert run(c, ["NT <"])[0] == ["ENT "]  # "EN" + "T" is no stop prefix, "<" is
    assert run(c, ["|i"])[0] == [""]
    assert run(c, ["x"])[0] == ["<|ix"]


def test_first_completed_stop_string_wins_and_text_after_it_is_dropped():
    c = checker(stop=("world", "lo"))
    emitted, reason = run(c, ["hello world and more"])
    assert reason == "stop" and c.text == "hel" and emitted == ["hel"]
    # "a" completes before "baa" does, whether the text comes in one delta or in two.
    assert run(checker(stop=("baa", "a")), ["baa"])[0] == ["b"]
    assert run(checker(stop=("baa", "a")), ["b", "aa"])[0] == ["", "b"]  # "b" held: it may start "baa"
    assert run(checker(stop=("ab", "b")), ["xab"])[0] == ["x"]  # same end: the longer one


def test_max_tokens_finishes_with_length_and_flushes_the_held_tail():
    c = checker(max_tokens=3, stop=("##",))
    emitted, reason = run(c, ["a", "b", "c#", "never"])
    assert emitted == ["a", "b", "c#"] and reason == "length"
    assert c.num_tokens == 3 and c.text == "abc#"


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop():
    c = checker(max_tokens=2, stop=("xy",))
    assert run(c, ["ax", "yz"]) == (["a", ""], "stop")


def test_eos_stops_and_its_text_is_not_emitted():
    c = checker(stop=("##",))
    assert c.step(5, "ok#").text == "ok"
    decision = c.step(EOS, "</s>")
    assert decision.finish_reason == "stop" and decision.text == "#"  # held tail flushed, eos text dropped
    assert c.text == "ok#"


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop():
    c = checker(ignore_eos=True, stop_token_ids=(9,))
    assert not c.step(EOS, "</s>").finished
    assert c.step(9, "").finish_reason == "stop"
    assert checker(ignore_eos=True).step(EOS, "").finish_reason is None


def test_stop_token_id_without_eos_ids():
    c = StopChecker(SamplingParams(stop_token_ids=(4,)))
    assert not c.is_stop_token(EOS) and c.is_stop_token(4)


def test_external_finish_flushes_and_step_after_finish_fails():
    c = checker(stop=("abc",))
    c.step(1, "xab")
    decision = c.finish("length")
    assert decision.text == "ab" and c.text == "xab" and c.finish_reason == "length"
    with pytest.raises(RuntimeError, match="finished"):
        c.step(1, "z")


def longest_stop_prefix_suffix(text, stops):
    return max((n for s in stops for n in range(len(s)) if n <= len(text) and text.endswith(s[:n])), default=0)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_streaming_equals_cutting_the_whole_text(text, stops, cuts):
    """Any split of the text into deltas emits what a character stream would, holding back no more than needed."""
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    c = checker(stop=tuple(stops))
    seen = ""
    for delta in deltas:
        seen += delta
        decision = c.step(7, delta)
        if decision.finished:
            break
        assert c.text == seen[: len(seen) - longest_stop_prefix_suffix(seen, stops)]
    # Where a character-by-character stream stops: the first prefix of the text that ends with a stop string.
    end = next((n for n in range(len(text) + 1) if any(text[:n].endswith(s) for s in stops)), None)
    if end is not None:
        start = min(end - len(s) for s in stops if text[:end].endswith(s))
        assert (c.finish_reason, c.text) == ("stop", text[:start])
    else:
        assert c.finish_reason is None
        c.finish("length")
        assert c.text == text
