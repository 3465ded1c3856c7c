"""The router's ping-pong micro-batches (moemesh/runtime/micro_batch.py): when to split, and the second dispatch.

A split step keeps two MoE layers in flight per shard (half A's and half B's), but a link carries one at a time (one
shared-memory region, one cuda_ipc flag block per link), so half B gets a second dispatch of the same kind: a second
Attach to every shard. Shards serve several attachments already (M:N: one serving thread or CUDA stream each, one
expert forward at a time), so nothing changes on the shard side.

Off (no second dispatch) when:
  - the experts run in the router (no shards): a split only adds launches;
  - a shard is linked by torch.distributed (gloo/nccl): a group link carries one request at a time per pair of ranks
    and a second group per router is not built;
  - --pingpong-min-seqs 0, the default. Measured on the shared 2-core CPU (benchmarks/pingpong_cpu.py, 2 shards
    over shm, benchmarks/results/pingpong-cpu.md): decode tok/s on/off 0.72x / 0.84x / 0.85x at 8 / 16 / 64
    sequences in the least loaded run (load 8-10); runs at load 11-26 gave 1.13-1.16x at 64, one at load 15-34
    0.39x. The split costs work: per streamed token about +30% router and +55% shard CPU at 8 sequences, +10% /
    +25% at 64 (twice the per-layer calls, half the rows each), and three compute processes on two busy cores leave
    little idle time for the overlap to fill. On one H200 (split steps of the paged decode runner captured in their
    own CUDA graphs, gpu/decode_graphs.py; one cuda_ipc shard process; `benchmarks/mesh_gpu.py --variants
    ipc-1-pp,ipc-1`, Qwen3-30B-A3B shape, 64 sequences) it loses too: 1,300 vs 1,750 decode tok/s (0.74x), and under
    CUDA MPS 1,693 vs 2,532 (0.67x; benchmarks/results/mesh-h200-pingpong*.md): router and shard share the same
    SMs, so there is no idle device to overlap into, while the split doubles the per-layer flag hand-offs and halves
    the expert GEMMs' rows. The gain MegaScale-Infer reports needs attention and experts on different GPUs (the
    multi-GPU issue); `--pingpong-min-seqs 8` turns it on anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from moemesh.runtime.micro_batch import MicroBatching
from services.router import cuda_ipc_dispatch
from services.router.expert_client import GrpcShardClient
from services.router.link_choice import is_local
from services.router.shm_dispatch import ShmDispatch

log = logging.getLogger("services.router")


def start(config, spec, clients: Sequence[GrpcShardClient], dispatch) -> MicroBatching | None:
    """MicroBatching with a second dispatch to the same shards, or None (the reason logged)."""
    threshold = config.pingpong_min_seqs
    why = _refusal(threshold, dispatch)
    if why:
        log.info("ping-pong micro-batches off: %s", why)
        return None
    try:
        second = _second(config, spec, clients, dispatch)
    except ConnectionError as exc:  # the shards refused a second attachment: serve unsplit
        log.warning("ping-pong micro-batches off: second links refused (%s)", exc)
        return None
    log.info("ping-pong micro-batches on: steps of >= %d sequences split in two (second links: %s)", threshold,
             ", ".join(second.transports()))
    return MicroBatching(second, threshold)


def _second(config, spec, clients: Sequence[GrpcShardClient], dispatch):
    """A second dispatch of the same kind as `dispatch` to the same shards; ConnectionError when refused."""
    if isinstance(dispatch, cuda_ipc_dispatch.CudaIpcDispatch):
        return cuda_ipc_dispatch.start(clients, dispatch.placement, mode="cuda_ipc", device=config.device,
                                       spec=spec, local=[is_local(c.address) for c in clients],
                                       call_timeout=config.expert_timeout)
    second = ShmDispatch.start(clients, dispatch.placement, spec.num_experts, mode=dispatch.mode,
                               hidden_size=spec.hidden_size, top_k=spec.moe.top_k,
                               stall_timeout=config.stall_timeout, call_timeout=config.expert_timeout,
                               device=config.device, join_timeout=config.join_timeout, dist_host=config.dist_host)
    second.split = dispatch.split  # replicated experts: the same per-slot split
    return second


def _refusal(threshold: int, dispatch) -> str:
    if threshold == 0:
        return "--pingpong-min-seqs is 0 (the default)"
    if dispatch is None:
        return "the experts run in the router (a split only adds launches)"
    kinds = set(dispatch.transports())
    if kinds & {"gloo", "nccl"}:
        return f"shards linked by torch.distributed ({', '.join(sorted(kinds))})"
    return ""


def close(micro: MicroBatching | None) -> None:
    if micro is not None:
        micro.second.close()
