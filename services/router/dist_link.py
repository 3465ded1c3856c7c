"""The router's end (rank 0) of the torch.distributed expert data plane (wire format: moemesh/serving/dist_wire.py).

DistGroup forms one process group with every shard of this transport (ranks 1..N in their order): a fresh TCPStore
on a free port, JoinGroup RPCs to all shards at once, then rank 0's own member, which returns once every rank has
connected. One DistLink per shard gives ShmDispatch the interface of ShmLink (attach / start / wait / close): start
posts the request sends and the reply receives, wait blocks on the receives. Any fault (a dead shard closes its
sockets: the receive fails at once; a silent one misses its heartbeats, sent every stall_timeout/6 while a block
computes, for stall_timeout once the block is overdue for its size: the bounded gloo wait, which cannot be
polled, times out) marks the group broken, so every link of it reports down and the step fails; the group object
is dropped once no operation is pending (at the next form or close) and begin_step re-forms it, with new JoinGroup
calls, when the shards answer again.

Every formation also keeps one Expert/Watch stream per shard (services/router/shard_watch.py). NCCL, which sees
neither a dead nor a stopped peer, waits by polling and fails the step as soon as the watch names a lost shard (its
stream broke: at once; no beat for stall_timeout: stalled), then aborts the group (ncclCommAbort) so no kernel is
left waiting; a live shard's long block keeps beating and only call_timeout bounds it. gloo needs no polling (its
heartbeats and closed sockets say as much, and its point-to-point works complete only inside a blocking wait).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from concurrent.futures import Future

import grpc
import torch
import torch.distributed as dist

from moemesh.serving import dist_wire
from moemesh.v1 import expert_pb2
from services.router import stall_deadline
from services.router.expert_client import ExpertCallError, GrpcShardClient
from services.router.shard_watch import GroupWatch
from services.router.shm_link import AttachRefused

log = logging.getLogger("services.router.dist")
UNBOUNDED = 1 << 30  # no preallocated region limits T: buffers grow with the step


class DistGroup:
    def __init__(self, clients: list[GrpcShardClient], *, backend: str, hidden_size: int, top_k: int, dtype: str,
                 device: str = "cpu", join_timeout: float = 10.0, stall_timeout: float = stall_deadline.DEFAULT_S,
                 call_timeout: float = 30.0, advertise: str = "") -> None:
        self.backend, self.hidden_size, self.top_k, self.dtype = backend, hidden_size, top_k, dtype
        self.torch_dtype = dist_wire.DTYPES[dtype]
        self.device = torch.device(device if backend == "nccl" else "cpu")  # gloo moves CPU tensors only
        self.join_timeout, self.stall_timeout, self.call_timeout = join_timeout, stall_timeout, call_timeout
        self.advertise = advertise  # the rendezvous host the shards are told ("": our address on the route to each)
        # Wait by polling works and the watch (NCCL), or block on them (gloo: its works complete only in a wait)
        self.polled = backend == "nccl"
        self.links = [DistLink(self, client, rank) for rank, client in enumerate(clients, start=1)]
        self.members: list[DistLink] = []  # the links of the current formation (all, or those left after a fault)
        self.group = None
        self.broken = False
        self.aborted = ""  # why the group was aborted mid-step (NCCL), "" while it was not
        self.watch: GroupWatch | None = None  # the shards' liveness while formed
        self._store: dist.TCPStore | None = None
        self._generation = 0

    @property
    def formed(self) -> bool:
        return self.group is not None and not self.broken

    def form(self, skip: frozenset = frozenset()) -> None:
        """(Re-)forms the group with every link not in `skip` (a lost shard whose experts have live replicas), ranks
        1..n in link order; AttachRefused when a shard refuses, ExpertCallError when one fails or is absent."""
        self.teardown()
        self._generation += 1
        members = [link for link in self.links if link not in skip]
        for rank, link in enumerate(members, start=1):
            link.rank = rank
        name = f"moemesh-{os.getpid()}-{self._generation}"
        first_host = members[0].client.address.rpartition(":")[0].strip("[]")
        bind_ip = dist_wire.local_ip_towards(first_host)
        store = dist.TCPStore(bind_ip, 0, len(members) + 1, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=self.join_timeout))
        futures = [link.join(store.port, name, len(members) + 1) for link in members]  # rank 0 waits for them all
        try:
            group = dist_wire.form_group(store, name, 0, len(members) + 1, self.backend, bind_ip, self.join_timeout)
        except RuntimeError as exc:
            group, failure = None, exc
        for link, future in zip(members, futures):
            link.check_join(future)  # a shard's own reason beats rank 0's timeout
        if group is None:
            raise ExpertCallError(self.links[0].address, -1, grpc.StatusCode.UNAVAILABLE,
                                  f"{self.backend} group {name} not formed: {failure}")
        self.group, self._store, self.broken, self.aborted, self.members = group, store, False, "", members
        self.watch = GroupWatch([link.client for link in members], name, self.stall_timeout)
        log.info("%s group %s formed: router (rank 0) + %s", self.backend, name,
                 ", ".join(f"{link.address} (rank {link.rank})" for link in members))

    def teardown(self) -> None:
        """Drops the group (its peers see their connections close and end their memberships)."""
        for link in self.links:
            link.forget()
        if self.watch is not None:
            self.watch.close()  # the shards leave this formation when their Watch ends
        dist_wire.abort(self.group)
        self.group, self._store, self.broken, self.aborted, self.watch = None, None, False, "", None
        self.members = []

    def fault(self) -> str | None:
        """Why the group cannot complete the pending step (aborted, or a shard lost by the watch), or None."""
        if self.aborted:
            return self.aborted
        lost = self.watch.verdict() if self.watch is not None else None
        return None if lost is None else f"expert shard {lost[0]} {lost[1]}"

    def abort_now(self, why: str) -> None:
        """NCCL: aborts the communicators with works pending, so that every kernel of the step ends (each link's
        polled wait then fails with `why`); the watches close, so the shards leave the group too."""
        if not self.aborted:
            self.aborted, self.broken = why, True
            if self.watch is not None:
                self.watch.close()
            dist_wire.abort(self.group)


class DistLink:
    """One shard of a DistGroup, with the interface of ShmLink for ShmDispatch."""

    def __init__(self, owner: DistGroup, client: GrpcShardClient, rank: int) -> None:
        self.owner, self.client, self.address, self.rank = owner, client, client.address, rank
        self._request = torch.empty(0, dtype=torch.uint8, device=owner.device)  # packed bodies, grown as needed
        self._reply = torch.empty(0, dtype=torch.uint8, device=owner.device)  # header | output [T, H], grown
        self._pending: dict[str, object] = {}  # in-flight works and the tensors they read or write
        self.pace = stall_deadline.BlockPace()  # when a block of this link is overdue (gloo's bounded waits)

    @property
    def kind(self) -> str:
        return self.owner.backend

    @property
    def attached(self) -> bool:
        return self.owner.formed and self in self.owner.members

    @property
    def max_tokens(self) -> int:
        return UNBOUNDED

    def attach(self, max_tokens: int) -> None:
        if not self.owner.formed:
            self.owner.form()

    def join(self, store_port: int, name: str, world_size: int) -> Future:
        owner = self.owner
        store_host = owner.advertise or dist_wire.local_ip_towards(self.address.rpartition(":")[0].strip("[]"))
        request = expert_pb2.JoinGroupRequest(
            store_address=f"{store_host}:{store_port}", group_name=name, rank=self.rank,
            world_size=world_size, backend=owner.backend, hidden_size=owner.hidden_size,
            top_k=owner.top_k, dtype=owner.dtype, timeout_ms=int(owner.join_timeout * 1000),
            heartbeat_ms=max(1, int(stall_deadline.beat_s(owner.stall_timeout) * 1000)) if owner.backend == "gloo"
            else 0)
        return self.client.join_group(request, timeout=owner.join_timeout + 5)

    def check_join(self, future: Future) -> None:
        try:
            reply = future.result()
        except grpc.RpcError as exc:
            raise ExpertCallError(self.address, -1, exc.code(), f"JoinGroup: {exc.details()}") from None
        if not reply.ok:
            raise AttachRefused(f"expert shard {self.address}: {reply.reason}")

    def start(self, seq: int, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              trace_context: str = "") -> None:
        """Packs hidden [T, H], topk_ids [T, K], topk_weights [T, K] and posts the sends and the reply receives."""
        owner, tokens = self.owner, hidden.shape[0]
        if owner.device.type == "cuda":  # NCCL uses the calling thread's current device (the engine thread's)
            torch.cuda.set_device(owner.device)
        body = self._grow_request(dist_wire.body_bytes(tokens, owner.hidden_size, owner.top_k, owner.torch_dtype))
        h, ids, w = dist_wire.unpack(body, tokens, owner.hidden_size, owner.top_k, owner.torch_dtype)
        h.copy_(hidden)
        ids.copy_(topk_ids)
        w.copy_(topk_weights)
        # gloo: the step's trace context rides along on its first layer (word 5 = its length, tag CONTEXT)
        context = trace_context.encode() if trace_context and owner.backend == "gloo" else b""
        head = dist_wire.header(dist_wire.LAYER, seq, layer, tokens, extra=len(context), device=owner.device)
        reply = self._grow_reply(dist_wire.HEAD_BYTES + tokens * owner.hidden_size * owner.torch_dtype.itemsize)
        group = owner.group
        try:
            self._pending = {
                "head": head, "body": body, "reply": reply,
                "send_head": group.send([head], self.rank, dist_wire.REQUEST_HEAD),
                "send_body": group.send([body], self.rank, dist_wire.REQUEST_BODY),
                "recv": group.recv([reply], self.rank, dist_wire.REPLY)}
            if context:
                text = torch.frombuffer(bytearray(context), dtype=torch.uint8)
                self._pending.update(text=text, send_context=group.send([text], self.rank, dist_wire.CONTEXT))
        except RuntimeError as exc:
            self._fail(layer, f"send failed: {exc}")

    def wait(self, seq: int, layer: int, tokens: int) -> torch.Tensor:
        """Blocks until the shard's reply to `seq`; returns the output rows [T, H] (a view: use before next start)."""
        pending, owner = self._pending, self.owner
        try:
            if owner.polled:
                self._wait_polled(pending)
            else:
                self._wait_gloo(pending, tokens)
            head, out = dist_wire.reply_views(pending["reply"], tokens, owner.hidden_size, owner.torch_dtype)
            # The reply header says whether the shard computed this layer: the dist transport reads it on the host
            # every layer by design (gloo: a host tensor, no device sync; NCCL links are not graph-captured).
            kind, got_seq, _, _, status, text_len = head[:6].tolist()
        except RuntimeError as exc:
            self._fail(layer, _describe(exc, owner.stall_timeout))
        finally:
            self._pending = {}
        if kind != dist_wire.REPLY or got_seq != seq:
            self._fail(layer, f"protocol: reply kind {kind} seq {got_seq} to request seq {seq}")
        if status:  # the shard is in step (it sent the whole reply): the group stays
            text = bytes(out.reshape(-1).view(torch.uint8)[:text_len].cpu().tolist()).decode(errors="replace")
            raise ExpertCallError(self.address, layer, grpc.StatusCode.FAILED_PRECONDITION, text)
        return out

    def _wait_gloo(self, pending: dict, tokens: int) -> None:
        """Blocking waits: a dead shard's closed sockets fail them at once, a silent one misses its heartbeat."""
        owner, start = self.owner, time.monotonic()
        deadline, beat_s = start + owner.call_timeout, owner.stall_timeout
        overdue_at = start + self.pace.overdue_after(tokens)  # stall_deadline.BlockPace: a decode block at once
        # A gloo send completes once the shard posted its receive, which a live shard does at once.
        for key in ("send_head", "send_body", "send_context"):
            if key in pending:
                dist_wire.wait(pending[key], beat_s)
        while True:
            # A timeout (which ends the group) = no message for beat_s, and only once the block is overdue.
            now = time.monotonic()
            dist_wire.wait(pending["recv"], min(max(beat_s, overdue_at - now), max(deadline - now, 0.01)))
            head, _ = dist_wire.reply_views(pending["reply"], tokens, owner.hidden_size, owner.torch_dtype)
            if int(head[0]) != dist_wire.BEAT:
                if tokens >= stall_deadline.PACE_MIN_TOKENS:
                    self.pace.observe(time.monotonic() - start, tokens)
                return
            if time.monotonic() > deadline:  # a live shard, but slower than call_timeout
                raise RuntimeError(f"no reply within {owner.call_timeout} s")
            pending["recv"] = owner.group.recv([pending["reply"]], self.rank, dist_wire.REPLY)

    def _wait_polled(self, pending: dict) -> None:
        """NCCL: polls every work, failing (and aborting the group) once the watch names a lost shard."""
        owner = self.owner
        deadline = time.monotonic() + owner.call_timeout

        def fault() -> str | None:
            if time.monotonic() > deadline:  # the watch says every shard lives: a block slower than call_timeout
                return f"no reply within {owner.call_timeout} s"
            return owner.fault()

        try:
            for key in ("send_head", "send_body", "send_context", "recv"):
                if key in pending:
                    dist_wire.wait_polled(pending[key], fault)
        except RuntimeError as exc:
            owner.abort_now(str(exc))
            raise
        if owner.aborted:  # another link's failure aborted the group: this reply is not trustworthy
            raise RuntimeError(owner.aborted)

    def _grow_request(self, nbytes: int) -> torch.Tensor:
        if self._request.numel() < nbytes:
            self._request = torch.empty(1 << (nbytes - 1).bit_length(), dtype=torch.uint8, device=self.owner.device)
        return self._request[:nbytes]

    def _grow_reply(self, nbytes: int) -> torch.Tensor:
        if self._reply.numel() < nbytes:
            self._reply = torch.empty(1 << (nbytes - 1).bit_length(), dtype=torch.uint8, device=self.owner.device)
        return self._reply[:nbytes]

    def _fail(self, layer: int, why: str):
        # Not torn down here: other links of the group may still have operations in flight (collect waits them).
        self.owner.broken = True
        raise ExpertCallError(self.address, layer, grpc.StatusCode.UNAVAILABLE, f"{self.owner.backend}: {why}")

    def forget(self) -> None:
        self._pending = {}

    def close(self) -> None:
        self.owner.teardown()


def _describe(exc: RuntimeError, beat_s: float) -> str:
    text = str(exc)
    if "closed by peer" in text or "Connection reset" in text:
        return "the shard closed its connection (process exited?)"
    if "Timed out" in text or "timeout" in text.lower():
        return f"stalled: no reply or heartbeat for {beat_s:.2f} s"
    return text.splitlines()[0][:300] if text else type(exc).__name__
