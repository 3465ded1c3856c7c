"""Ping-pong micro-batches (as in MegaScale-Infer, arXiv 2504.02263): a step's sequences split into two halves, A and
B, that take turns so that one half's routed experts are out at the shards while the router computes the other's
attention, norms, gates, shared experts and dense layers.

    per MoE layer L:  A: attn(L) gate submit(L) shared(L) | B: attn(L) gate submit(L) shared(L) |
                      A: collect(L) ... attn(L+1) submit(L+1) ... | B: collect(L) ... | ...

Each half is its own Backbone.hidden_steps generator (it yields while its experts are out) over its own StepContext
and its own ExpertDispatch: two dispatches because a transport holds one in-flight layer per link (a shared-memory
region, a cuda_ipc flag block), so B needs a second set of links to the same shards. Only the router builds one,
and only for remote shards (services/router/pingpong.py): with experts in process a split only adds launches.

Invariants: the split falls on sequence boundaries (A = works[:k], B = works[k:]), so each sequence's K/V slots,
positions and causal mask are exactly those of the unsplit step, and logits rows (work order, increasing) of A come
before B's: concatenating the halves' logits gives the unsplit layout [N, V]. Nothing here syncs the host with the
device: the row split is done on the host copy of the rows before they move. On CUDA the paged decode runner
(gpu/decode_graphs.py) splits its bucket's rows at b/2 instead, inside its own CUDA graphs (split_logits).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager

import torch

from moemesh.runtime.step_context import StepContext
from moemesh.runtime.types import ExpertDispatch

def split_point(new: Sequence[int], min_seqs: int) -> int | None:
    """k such that works[:k] (A) and works[k:] (B) carry token counts as even as sequence boundaries allow; None
    when the step has fewer than max(min_seqs, 2) sequences or min_seqs is 0 (off). new: tokens of each work."""
    if min_seqs <= 0 or len(new) < max(min_seqs, 2):
        return None
    total, run, best, best_gap = sum(new), 0, 1, None
    for k in range(1, len(new)):
        run += new[k - 1]
        gap = abs(2 * run - total)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
    return best


def alternate(halves: list[Generator[None, None, torch.Tensor]]) -> list[torch.Tensor]:
    """Advances each generator to its next yield in turn until all return; their return values, in order."""
    results: list[torch.Tensor | None] = [None] * len(halves)
    live = list(range(len(halves)))
    while live:
        for i in list(live):
            try:
                next(halves[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results  # type: ignore[return-value]


@contextmanager
def stepping(parts: Sequence[tuple[ExpertDispatch, int]]) -> Iterator[None]:
    """begin_step(rows) on each (dispatch, rows) in order; end_step on every begun one afterwards, also after a
    failure (a dispatch's end_step looks at sys.exc_info() to tell)."""
    begun: list[ExpertDispatch] = []
    try:
        for dispatch, rows in parts:
            dispatch.begin_step(rows)
            begun.append(dispatch)
        yield
    finally:
        for dispatch in begun:
            dispatch.end_step()


def split_logits(backbone, halves: Sequence[tuple[torch.Tensor, object, ExpertDispatch]], pools: list | None,
                 rows: Sequence[torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """Ping-pong forward of two halves (token ids [T_i], step context, dispatch) -> logits [N, V] float32 of each
    half's `rows` (device int64; None: all its rows), A's before B's. No host sync (the GPU decode runner captures
    it)."""
    hidden = alternate([backbone.hidden_steps(ids, ctx, dispatch, pools) for ids, ctx, dispatch in halves])
    picked = torch.cat([h if r is None else h[r] for h, r in zip(hidden, rows)])  # [N, H] after the final norm
    return backbone.logits(picked)  # one pass over the LM head for both halves


class MicroBatching:
    """The second dispatch and the threshold; `forward` runs one split step."""

    def __init__(self, second: ExpertDispatch, min_seqs: int = 8) -> None:
        if min_seqs < 0:
            raise ValueError(f"min_seqs must be >= 0 (0: off), got {min_seqs}")
        self.second, self.min_seqs = second, min_seqs
        self.steps = 0  # split steps run (tests and Router.Info-style counters)

    def split_at(self, new: Sequence[int]) -> int | None:
        return split_point(new, self.min_seqs)

    def forward(self, backbone, first: ExpertDispatch, tokens: torch.Tensor, cached: list[int], new: list[int],
                tables: list[list[int]], block_size: int, pools: list | None, rows: torch.Tensor,
                k: int) -> torch.Tensor:
        """Logits [N, V] float32 of `rows` (host int64, increasing) of a step of T = sum(new) tokens [T] (on the
        device), split after work k: A on `first`, B on the second dispatch."""
        device, t_a = tokens.device, sum(new[:k])
        cut = int(torch.searchsorted(rows, t_a))  # rows[:cut] are A's rows (host tensor: no device sync)
        a, b = slice(0, k), slice(k, len(new))
        ctx = [StepContext.build(cached[s], new[s], tables[s], block_size, device) for s in (a, b)]
        with stepping([(first, t_a), (self.second, tokens.shape[0] - t_a)]):
            logits = split_logits(backbone, [(tokens[:t_a], ctx[0], first), (tokens[t_a:], ctx[1], self.second)],
                                  pools, [rows[:cut].to(device), (rows[cut:] - t_a).to(device)])
        self.steps += 1
        return logits
