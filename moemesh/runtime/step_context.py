"""Index tensors of one ragged step: B sequences, sequence b has c_b tokens cached and n_b new tokens this step
(a prefill chunk, a whole prompt, or one decode token), all flattened into T = sum(n_b) rows through the model.

Attention pads per sequence: queries to [B, Tq, ...] (Tq = max n_b) and the context (cached + new keys) to
[B, Tk, ...] (Tk = max(c_b + n_b)), gathered from the paged KV pools through `ctx_index`; `mask` [B, 1, Tq, Tk] is
causal with each sequence's own offset: query t of sequence b sees keys 0 .. c_b + t. Padded rows are discarded.
Without a cache (full-sequence scoring) the context is the step's own new tokens (every c_b must be 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moemesh.runtime.kv_cache import gather, narrow, store


@dataclass
class StepContext:
    positions: torch.Tensor  # [T] int64, absolute position of every new token
    seq_of_token: torch.Tensor  # [T] int64, b of every new token
    q_index: torch.Tensor  # [T] int64, row of every new token in the flattened [B * Tq] padded queries
    ctx_index: torch.Tensor  # [B, Tk] int64, pool slot (paged) or step row (no cache) of each context key
    slots: torch.Tensor | None  # [T] int64, pool slot each new token's K/V is written to; None: no cache
    batch: int
    q_len: int  # Tq
    kv_len: int  # Tk
    cached: torch.Tensor  # [B] int64, c_b
    new: torch.Tensor  # [B] int64, n_b
    starts: torch.Tensor  # [B] int64, first row of each sequence
    table: torch.Tensor | None  # [B, W] int64 block tables (paged), None: no cache
    block_size: int
    new_list: tuple[int, ...]  # n_b on the host
    kv_dtype: torch.dtype | None = None  # without a cache: round K/V as a cache of this dtype would (fp8 scoring)
    _mask: torch.Tensor | None = field(default=None, repr=False)
    _tiles: dict = field(default_factory=dict, repr=False)

    @property
    def mask(self) -> torch.Tensor:
        """[B, 1, Tq, Tk] bool, True where attention is allowed; built on first use (the paged prefill kernel and
        one-sequence SDPA on CUDA never need it)."""
        if self._mask is None:
            self._mask = self._build_mask(self.cached, self.new, self.q_len, self.kv_len, self.positions.device)
        return self._mask

    def tiles(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """gpu/prefill_attention.py's tile list for `group` query heads per kv head, once per step."""
        if group not in self._tiles:
            from moemesh.runtime.gpu.prefill_attention import tiles

            self._tiles[group] = tiles(list(self.new_list), group, self.positions.device)
        return self._tiles[group]

    @classmethod
    def build(
        cls,
        cached: list[int],
        new: list[int],
        block_tables: list[list[int]] | None,
        block_size: int,
        device: torch.device | str,
    ) -> StepContext:
        """block_tables: each sequence's KV blocks (covering c_b + n_b tokens), or None for no cache."""
        b = len(new)
        q_len, kv_len = max(new), max(c + n for c, n in zip(cached, new))
        cached_t = torch.tensor(cached, dtype=torch.int64, device=device)  # [B]
        new_t = torch.tensor(new, dtype=torch.int64, device=device)  # [B]
        seq_of_token = torch.repeat_interleave(torch.arange(b, device=device), new_t)  # [T]
        starts = torch.cumsum(new_t, 0) - new_t  # [B] first row of each sequence
        offset = torch.arange(seq_of_token.numel(), device=device) - starts[seq_of_token]  # [T] t within its chunk
        positions = cached_t[seq_of_token] + offset
        q_index = seq_of_token * q_len + offset
        j = torch.arange(kv_len, device=device)  # [Tk]
        valid = j[None, :] < (cached_t + new_t)[:, None]  # [B, Tk]
        if block_tables is None:
            if any(cached):
                raise ValueError(f"scoring without a cache needs every sequence to start at 0, got cached {cached}")
            ctx_index = torch.where(valid, starts[:, None] + j[None, :], 0)
            slots, table = None, None
        else:
            width = max(len(t) for t in block_tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64, device=device)
            block_of_j = torch.clamp(j // block_size, max=width - 1)
            ctx_index = torch.where(valid, table[:, block_of_j] * block_size + j % block_size, 0)  # [B, Tk]
            slots = ctx_index[seq_of_token, positions]
        return cls(positions, seq_of_token, q_index, ctx_index, slots, b, q_len, kv_len, cached_t, new_t, starts,
                   table, block_size, tuple(new))

    @staticmethod
    def _build_mask(cached: torch.Tensor, new: torch.Tensor, q_len: int, kv_len: int,
                    device: torch.device | str) -> torch.Tensor:
        t = torch.arange(q_len, device=device)[None, :, None]  # [1, Tq, 1]
        j = torch.arange(kv_len, device=device)[None, None, :]  # [1, 1, Tk]
        allowed = j <= cached[:, None, None] + t  # [B, Tq, Tk] causal with the sequence's offset
        real_row = t < new[:, None, None]  # [B, Tq, 1]
        # Padded query rows see key 0 only: never an all-masked row (NaN in softmax); their output is dropped.
        allowed = torch.where(real_row, allowed, j == 0)
        return allowed[:, None, :, :]

    def context(
        self, pools: tuple[torch.Tensor, torch.Tensor] | None, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's per-token cache entries a [T, *A], b [T, *B] into the layer's pools (if any) and return
        every sequence's whole context: [B, Tk, *A], [B, Tk, *B]."""
        # index_select/index_copy_ rather than advanced indexing: same result, but no parallel region for a few
        # rows (advanced indexing costs milliseconds per call on a busy 2-core machine).
        flat = self.ctx_index.reshape(-1)  # [B * Tk]
        if pools is None:
            source_a, source_b = (narrow(z, self.kv_dtype) for z in (a, b)) if self.kv_dtype else (a, b)
        else:
            source_a, source_b = pools
            store(source_a, self.slots, a)
            store(source_b, self.slots, b)
        shape = (self.batch, self.kv_len)
        return (gather(source_a, flat).view(*shape, *a.shape[1:]), gather(source_b, flat).view(*shape, *b.shape[1:]))

    def pad_queries(self, q: torch.Tensor) -> torch.Tensor:
        """[T, *S] -> [B, Tq, *S] (zeros in padded rows)."""
        if self.batch == 1:
            return q.unsqueeze(0)  # one sequence: nothing to pad
        padded = q.new_zeros(self.batch * self.q_len, *q.shape[1:])
        padded.index_copy_(0, self.q_index, q)
        return padded.view(self.batch, self.q_len, *q.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Tq, *S] -> [T, *S]."""
        if self.batch == 1:
            return x[0]
        return x.reshape(self.batch * self.q_len, *x.shape[2:]).index_select(0, self.q_index)
