"""ShmDispatch: RemoteDispatch whose shards take a data plane off gRPC: shared memory on this host
(services/router/shm_link.py) or a torch.distributed group (services/router/dist_link.py), same link interface.

Transport per shard, chosen at start-up (services/router/link_choice.py) and shown in Router.Info / the log: "shm"
for a shard on this host that accepted Attach, "gloo"/"nccl" for the shards of the process group, "grpc" for the
others, "<kind>-down" while a shard is lost. Per layer, submit writes every token of the layer into each shm shard's
region or posts it to each group shard (the shard masks the experts it does not host; with dense routing every shard
needs every token anyway), then signals all of them back to back before returning; collect waits for every reply and sums the
partial outputs in float32. gRPC shards keep the Forward path of RemoteDispatch in the same layer. A lost shard
fails the step (ExpertCallError, UNAVAILABLE); begin_step re-attaches it (a process group: re-forms it with all its
shards), at most once per retry_s, once it answers again with the same placement. Until then, when every expert of
the lost shard has a replica on a live shard (a placement file with replicas), the steps go on without it: its
experts' tokens go to their other replicas (ReplicaSplit.without), and it rejoins once re-attached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc
import torch

from services.router.dispatch import RemoteDispatch
from services.router.dist_link import DistLink
from services.router.expert_client import ExpertCallError, GrpcShardClient
from services.router.link_choice import MIN_TOKENS, forced_refusal, is_local, open_links  # noqa: F401 (is_local: API)
from services.router.placement import Placement, ReplicaSplit
from services.router.shm_link import AttachRefused, ShmLink
from services.router.step_trace import current_step

log = logging.getLogger("services.router.shm")
# How long collect polls for each further reply once the first is in (shm_region: a blocking wait would halt the core
# the first shard freed; the shards of a layer do about the same work, so the rest follow within microseconds).
SPIN_AFTER_FIRST_S = 200e-6
# A shard routed around is probed less often and more briefly: its Info call blocks the engine thread (a stopped
# shard answers nothing), while the steps no longer wait for it.
AROUND_RETRY_S, AROUND_INFO_TIMEOUT_S = 2.0, 0.25


def _bucket(tokens: int) -> int:
    """A grown region's rows: the next power of two, at least MIN_TOKENS."""
    return max(MIN_TOKENS, 1 << (max(tokens, 1) - 1).bit_length())


class ShmDispatch(RemoteDispatch):
    mode = "auto"  # --expert-transport; a forced one (shm, dist) never falls back to gRPC, also on re-attach

    def __init__(self, clients: Sequence[GrpcShardClient], placement: Placement, num_experts: int,
                 links: list[ShmLink | DistLink | None], *, retry_s: float = 0.5) -> None:
        super().__init__(clients, placement, num_experts)
        self._links, self.retry_s = list(links), retry_s
        self._retry_at = [0.0] * len(links)
        self._seq = 0
        self._lost: set[int] = set()  # shards routed around: down, every expert of theirs has a live replica
        self._around: ReplicaSplit | None = None  # self.split without the lost shards
        self._traced: tuple[object, set[int]] = (None, set())  # (step trace, shards already sent its context)

    @classmethod
    def start(cls, clients: Sequence[GrpcShardClient], placement: Placement, num_experts: int, *, mode: str,
              hidden_size: int, top_k: int, stall_timeout: float, call_timeout: float, device: str = "cpu",
              join_timeout: float = 10.0, dist_host: str = "") -> ShmDispatch:
        """Links per shard as services/router/link_choice.py says for `mode` (auto, shm, dist, grpc); refusals of
        a forced mode raise ConnectionError naming the shard and why."""
        links = open_links(clients, mode=mode, device=device, hidden_size=hidden_size, top_k=top_k,
                           stall_timeout=stall_timeout, call_timeout=call_timeout, join_timeout=join_timeout,
                           dist_host=dist_host)
        dispatch = cls(clients, placement, num_experts, links)
        dispatch.mode = mode
        for client, transport in zip(clients, dispatch.transports()):
            log.info("expert shard %s: transport %s", client.address, transport)
        return dispatch

    def transports(self) -> list[str]:
        """Per shard, in placement order: "shm", "gloo", "nccl", "grpc", or "<kind>-down" while lost."""
        return ["grpc" if link is None else link.kind if link.attached else f"{link.kind}-down"
                for link in self._links]

    def _peers(self, i: int) -> list[int]:
        """Shards whose links stand or fall with link i's: its process group's (torch.distributed), else i."""
        owner = getattr(self._links[i], "owner", None)
        if owner is None:
            return [i]
        return [j for j, link in enumerate(self._links) if getattr(link, "owner", None) is owner]

    def begin_step(self, tokens: int) -> None:
        for i, link in enumerate(self._links):
            if link is not None and (not link.attached or tokens > link.max_tokens):
                try:
                    self._reattach(i, link, tokens)
                except ExpertCallError as exc:
                    if not self._route_around(i):
                        raise
                    log.debug("expert shard %s still routed around: %s", link.address, exc)
                    continue
            if i in self._lost and link is not None and link.attached:
                self._lost.discard(i)
                self._around = self.split.without(self._lost) if self._lost else None
                log.info("expert shard %s is back: its experts' tokens are split over every replica again",
                         self._clients[i].address)

    def _route_around(self, i: int) -> bool:
        """Steps go on without lost shard i when every expert of it has a replica on a live shard."""
        around = self.split.without(self._lost | {i}) if self.split is not None else None
        if around is None:
            return False
        if i not in self._lost:
            log.warning("expert shard %s is down: its experts' tokens go to their replicas until it is back",
                        self._clients[i].address)
        self._lost.add(i)
        self._around = around
        return True

    def _reattach(self, i: int, link: ShmLink, tokens: int) -> None:
        grow, now = link.attached, time.monotonic()
        if not grow and now < self._retry_at[i]:
            raise ExpertCallError(link.address, -1, grpc.StatusCode.UNAVAILABLE,
                                  f"{link.kind} link down; next re-attach in {self._retry_at[i] - now:.1f} s")
        try:
            if not grow and isinstance(link, DistLink):
                self._reform(i, link)
            elif not grow:
                self._check_same_shard(i, link)
            link.attach(_bucket(max(tokens, link.max_tokens)))
        except AttachRefused as exc:
            if self.mode != "auto":  # forced: the step fails, the link stays down and is retried
                self._retry_at[i] = now + self.retry_s
                raise ExpertCallError(link.address, -1, grpc.StatusCode.UNAVAILABLE, forced_refusal(
                    link.address, link.kind, self.mode, str(exc))) from None
            log.warning("expert shard %s refused %s (%s); transport grpc", link.address, link.kind, exc)
            for j in self._peers(i):
                self._links[j] = None
            return
        except (ExpertCallError, OSError) as exc:
            self._retry_at[i] = now + (AROUND_RETRY_S if i in self._lost else self.retry_s)
            if isinstance(exc, ExpertCallError):
                raise
            raise ExpertCallError(link.address, -1, grpc.StatusCode.UNAVAILABLE, f"shm attach: {exc}") from None
        log.info("expert shard %s: %s %s", link.address, link.kind, "grown" if grow else "re-attached")

    def _reform(self, i: int, link: DistLink) -> None:
        """Re-forms link i's process group with every shard of it that answers with its placement; one that does
        not is left out when live replicas cover its experts (else the step fails), and rejoins at a later re-form."""
        out = set()
        for j in self._peers(i):
            try:
                self._check_same_shard(j, self._links[j])
            except ExpertCallError:
                if j == i or not self._route_around(j):
                    raise
                self._retry_at[j] = time.monotonic() + AROUND_RETRY_S
                out.add(self._links[j])
        link.owner.form(skip=frozenset(out))

    def _check_same_shard(self, i: int, link: ShmLink) -> None:
        """A shard that came back must host what the placement says (else the sums would be wrong)."""
        # Brief when the steps can go on without it anyway (routed around, or replicas cover it)
        brief = i in self._lost or (self.split is not None and self.split.without(self._lost | {i}) is not None)
        try:
            info = link.client.info_now(timeout=AROUND_INFO_TIMEOUT_S if brief else 1.0)
        except grpc.RpcError as exc:
            raise ExpertCallError(link.address, -1, exc.code(), f"Info: {exc.details()}") from None
        want = self.placement.shards[i]
        if tuple(info.layers) != tuple(want.layers) or tuple(info.experts) != tuple(want.experts):
            raise ExpertCallError(link.address, -1, grpc.StatusCode.FAILED_PRECONDITION,
                                  f"came back hosting experts {list(info.experts)} of layers {list(info.layers)}, "
                                  f"the placement says experts {list(want.experts)} of layers {list(want.layers)}")

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple:
        # hidden [T, H]; topk_ids [T, K] int64 (-1 unused); topk_weights [T, K] float32.
        step, self._seq = current_step(), self._seq + 1
        written, started, calls, errors = [], [], [], []
        split = self._around if self._lost else self.split
        assigned = split.assign(layer, topk_ids) if split is not None else None  # [T, K] with replicas
        for i in self._shards_of(layer):
            if i in self._lost:  # routed around: `assigned` gives it no slot
                continue
            link = self._links[i]
            ids, weights = (topk_ids, topk_weights) if assigned is None else \
                ReplicaSplit.only(assigned, i, topk_ids, topk_weights)  # replicas: only the slots shard i computes
            if link is None:
                call = self._grpc_submit(i, layer, hidden, topk_ids, topk_weights, step, assigned)
                if call is not None:
                    calls.append(call)
            elif not link.attached:
                errors.append(ExpertCallError(link.address, layer, grpc.StatusCode.UNAVAILABLE,
                                              f"{link.kind} link down"))
            elif isinstance(link, ShmLink):
                link.write(hidden, ids, weights)
                written.append(i)
            else:
                try:
                    link.start(self._seq, layer, hidden, ids, weights, self._trace_context(i, layer, step))
                    started.append(i)
                except ExpertCallError as exc:
                    errors.append(exc)
        # Shared memory: the signals go back to back, after every copy, so a shard that wakes on this core and
        # pre-empts the router does so only once every shard has its inputs.
        for i in written:
            try:
                self._links[i].signal(self._seq, layer, hidden.shape[0], self._trace_context(i, layer, step))
                started.append(i)
            except ExpertCallError as exc:
                errors.append(exc)
        return layer, hidden, self._seq, started, calls, errors, step, time.perf_counter()

    def _trace_context(self, i: int, layer: int, step) -> str:
        """The step's W3C context for shard i ("k=v" lines), on its first call of the step only: the shard joins
        its "expert.step" span to the trace (as over gRPC) at no per-layer cost."""
        if step is None:
            return ""
        if self._traced[0] is not step:
            self._traced = (step, set())
        if i in self._traced[1]:
            return ""
        self._traced[1].add(i)
        return "\n".join(f"{k}={v}" for k, v in step.headers(i, self._clients[i].address, layer).items())

    def collect(self, handle: tuple) -> torch.Tensor:
        layer, hidden, seq, started, calls, errors, step, t0 = handle
        tokens = hidden.shape[0]
        parts = []  # [T, H] views into shared memory, valid until the next submit
        spin = 0.0  # the first reply is slept for; once it is in, the others are due and the core it freed polls
        for i in started:  # every started shard is waited for, also after an error, so none is left mid-request
            try:
                link = self._links[i]
                parts.append(link.wait(seq, layer, tokens, spin) if isinstance(link, ShmLink) else
                             link.wait(seq, layer, tokens))
                spin = SPIN_AFTER_FIRST_S
            except ExpertCallError as exc:
                errors.append(exc)
                continue
            if step is not None:
                step.count(i, self._clients[i].address, layer, tokens, time.perf_counter() - t0)
        if len(parts) == 2 and not calls and not errors and hidden.dtype == torch.float32:
            return torch.add(parts[0], parts[1])  # the CPU default (two shards): one op, a fresh [T, H]
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # float32 accumulator
        for part in parts:
            out.add_(part)
        for call in calls:
            self._grpc_collect(call, layer, out, step)
        if errors:
            raise errors[0]
        return out.to(hidden.dtype)

    def close(self) -> None:
        for link in self._links:
            if link is not None:
                link.close()
