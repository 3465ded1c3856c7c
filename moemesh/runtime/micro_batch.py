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
device: the row split is done on the host copy of the rows before they move.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch
import torch.nn.functional as F

from moemesh.runtime.step_context import StepContext
from moemesh.runtime.types import ExpertDispatch

DEFAULT_MIN_SEQS = 8  # CPU default of the router's --pingpong-min-seqs


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


class MicroBatching:
    """The second dispatch and the threshold; `forward` runs one split step."""

    def __init__(self, second: ExpertDispatch, min_seqs: int = DEFAULT_MIN_SEQS) -> None:
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
        parts = ((first, slice(0, k), tokens[:t_a], rows[:cut]),
                 (self.second, slice(k, len(new)), tokens[t_a:], rows[cut:] - t_a))
        begun: list[ExpertDispatch] = []
        try:
            halves = []
            for dispatch, works, ids, _ in parts:
                ctx = StepContext.build(cached[works], new[works], tables[works], block_size, device)
                dispatch.begin_step(ids.shape[0])
                begun.append(dispatch)
                halves.append(backbone.hidden_steps(ids, ctx, dispatch, pools))
            hidden = alternate(halves)  # [T_A, H], [T_B, H] after the final norm
        finally:
            for dispatch in begun:
                dispatch.end_step()
        self.steps += 1
        return torch.cat([F.linear(h[r.to(device)], backbone.lm_head).float()
                          for h, (_, _, _, r) in zip(hidden, parts)])  # [N, V]
