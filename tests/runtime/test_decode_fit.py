"""Which steps the decode graphs take (decode_graphs.fits; CPU: no runner needed): up to the largest bucket of
tokens, and prefill chunks only while their rows' context reads stay under MAX_PREFILL_READS (past it the prefill
path is faster, benchmarks/results/cached-tail-h200.md)."""

from __future__ import annotations

from moemesh.runtime.gpu.decode_graphs import BUCKETS, MAX_PREFILL_READS, fits
from moemesh.runtime.types import SequenceWork


def test_decode_rows_fit_up_to_the_largest_bucket_whatever_their_context() -> None:
    assert BUCKETS[-1] == 512
    assert fits([SequenceWork(f"s{i}", [5], 30_000) for i in range(512)])
    assert not fits([SequenceWork(f"s{i}", [5], 10) for i in range(513)])
    assert not fits([SequenceWork("a", [], 10)])  # a work without tokens is not a decode row


def test_a_prefill_chunk_after_a_long_context_takes_the_prefill_path() -> None:
    assert fits([SequenceWork("a", [1] * 250, 4_000)])  # 250 x 4,250 reads: the graphs were 1.7x faster
    assert fits([SequenceWork("a", [1] * 128, 12_000)])  # 1.55M: 1.5x faster
    assert not fits([SequenceWork("a", [1] * 250, 12_000)])  # 3.06M: the prefill path was 1.2x faster
    at_limit = MAX_PREFILL_READS // 200 - 200
    assert fits([SequenceWork("a", [1] * 200, at_limit), SequenceWork("b", [2], 50_000)])
    assert not fits([SequenceWork("a", [1] * 200, at_limit + 1)])
