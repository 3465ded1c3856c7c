"""The shard side of the torch.distributed data plane (wire format: moemesh/serving/dist_wire.py).

JoinGroup -> DistServer.join: checks the request, connects to the router's TCP store, builds this rank's member of
the group (blocks until every rank connected) and starts a Member: a thread that loops on receiving a request header
from rank 0, then its packed body, runs ExpertShard.forward and sends one reply (header and [T, H] output); and,
for gloo, a thread that sends heartbeat headers while a block computes longer than heartbeat_ms. A membership ends
when its connection to the router closes (the router dropped the group to re-form it, or died); a new JoinGroup
starts a new one meanwhile, so nothing has to interrupt a thread blocked in a receive.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moemesh.serving import dist_wire
from moemesh.serving.telemetry import tracer as default_tracer
from services.expert import metrics
from services.expert.shard import ExpertShard
from services.expert.step_spans import CallStats, StepSpans

log = logging.getLogger("services.expert.dist")
IDLE_S = 7 * 24 * 3600.0  # a member waits this long for the router's next block (an idle mesh is not a fault)


@dataclass(frozen=True)
class JoinSpec:
    """What the router asks for (mirrors moemesh.v1.JoinGroupRequest)."""

    store_address: str
    group_name: str
    rank: int
    world_size: int
    backend: str
    hidden_size: int
    top_k: int
    dtype: str
    timeout_ms: int
    heartbeat_ms: int


class Member:
    def __init__(self, shard: ExpertShard, group, spec: JoinSpec, device: torch.device, spans: StepSpans) -> None:
        self._shard, self._group, self.spec, self._device = shard, group, spec, device
        self._dtype = dist_wire.DTYPES[spec.dtype]
        self._lock = threading.Lock()  # orders heartbeats before the reply of the same block
        self._busy: tuple[int, int, float] | None = None  # (seq, layer, since) of the block computing
        self._stop = threading.Event()
        # "expert.step" spans: recorded by the serving thread, ended by the sweeper once the router is idle (a
        # receive cannot time out to sweep: a gloo timeout ends the group). StepSpans is not thread-safe: the lock.
        self._spans, self._spans_lock, self._metadata = spans, threading.Lock(), {}
        threading.Thread(target=self._serve, name=f"dist-{spec.group_name}", daemon=True).start()
        threading.Thread(target=self._sweep, name=f"dist-spans-{spec.group_name}", daemon=True).start()
        if spec.heartbeat_ms and spec.backend == "gloo":
            threading.Thread(target=self._beat, name=f"dist-beat-{spec.group_name}", daemon=True).start()

    @property
    def alive(self) -> bool:
        return not self._stop.is_set()

    def _recv(self, tensor: torch.Tensor, tag: int, timeout_s: float) -> None:
        work = self._group.recv([tensor], 0, tag)
        if self.spec.backend == "nccl":  # polled: torch's NCCL wait with a timeout sleeps 1-10 ms between its polls
            deadline = time.monotonic() + timeout_s
            dist_wire.wait_polled(work, lambda: self._stopped(deadline))
        else:
            dist_wire.wait(work, timeout_s)
        if self._stop.is_set():  # ended meanwhile (NCCL: aborted, so the receive "completed" with nothing)
            raise RuntimeError("the membership ended (the router's watch ended)")

    def _stopped(self, deadline: float) -> str | None:
        """Why a polled NCCL receive must end (the membership ended, or nothing came before the deadline), or None."""
        if self._stop.is_set():
            return "the membership ended (the router's watch ended)"
        return "no message from the router in time" if time.monotonic() > deadline else None

    def _send(self, tensor: torch.Tensor, tag: int) -> None:
        self._group.send([tensor], 0, tag).wait()

    def _serve(self) -> None:
        spec, head = self.spec, torch.zeros(dist_wire.HEAD_WORDS, dtype=torch.int64, device=self._device)  # [8]
        body = torch.empty(0, dtype=torch.uint8, device=self._device)
        try:
            if self._device.type == "cuda":  # NCCL uses this thread's current device
                torch.cuda.set_device(self._device)
            with torch.inference_mode():
                while not self._stop.is_set():
                    self._recv(head, dist_wire.REQUEST_HEAD, IDLE_S)
                    _, seq, layer, tokens, _, context = head[:6].tolist()
                    nbytes = dist_wire.body_bytes(tokens, spec.hidden_size, spec.top_k, self._dtype)
                    if body.numel() < nbytes:
                        body = torch.empty(1 << (nbytes - 1).bit_length(), dtype=torch.uint8, device=self._device)
                    self._recv(body[:nbytes], dist_wire.REQUEST_BODY, spec.timeout_ms / 1000)
                    if context:  # the first layer of a router step: its trace context
                        self._metadata = self._trace_context(context)
                    self._block(seq, layer, tokens, body[:nbytes])
        except RuntimeError as exc:  # the router closed the group (re-forming it, or gone)
            log.info("%s group %s ended: %s", spec.backend, spec.group_name, str(exc).splitlines()[0][:200])
        except Exception:  # a fault of this member: leave the group, so the router's wait ends instead of hanging
            log.exception("%s group %s: the serving thread failed; leaving the group", spec.backend, spec.group_name)
        finally:
            self.close()
            with self._spans_lock:
                self._spans.close()

    def _trace_context(self, nbytes: int) -> dict[str, str]:
        text = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        self._recv(text, dist_wire.CONTEXT, self.spec.timeout_ms / 1000)
        lines = bytes(text.cpu().tolist()).decode(errors="replace").splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def _sweep(self) -> None:
        while not self._stop.wait(self._spans.idle_s):
            with self._spans_lock:
                self._spans.sweep()

    def _block(self, seq: int, layer: int, tokens: int, body: torch.Tensor) -> None:
        """Computes one layer's block and replies (status 1 + the error text in the body on failure)."""
        spec = self.spec
        hidden, ids, weights = dist_wire.unpack(body, tokens, spec.hidden_size, spec.top_k, self._dtype)
        start, start_ns, status, text = time.perf_counter(), time.time_ns(), 0, b""
        with self._lock:
            self._busy = (seq, layer, time.monotonic())
        try:
            out = self._shard.forward(layer, hidden, ids, weights).to(self._device)  # [T, H]
        except Exception as exc:  # reported to the router, which fails the step
            status, text = 1, f"{type(exc).__name__}: {exc}".encode()
            out = torch.zeros(tokens, spec.hidden_size, dtype=self._dtype, device=self._device)
        compute = time.perf_counter() - start
        reply = torch.empty(dist_wire.HEAD_BYTES + out.numel() * out.element_size(), dtype=torch.uint8,
                            device=self._device)  # header | output [T, H]: the size the router posted
        head, body = dist_wire.reply_views(reply, tokens, spec.hidden_size, self._dtype)
        body.copy_(out)
        text = text[:out.numel() * out.element_size()]
        if text:
            body.reshape(-1).view(torch.uint8)[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        head.copy_(dist_wire.header(dist_wire.REPLY, seq, layer, tokens, status, len(text), self._device))
        with self._lock:  # no heartbeat of this block after its reply
            self._busy = None
            self._send(reply, dist_wire.REPLY)
        metrics.observe_forward(layer, tokens, body.numel(), reply.numel(), compute, status == 0)
        metrics.ROUTER_TOKENS.labels(spec.group_name).inc(tokens if status == 0 else 0)  # M:N: a group per router
        with self._spans_lock:
            self._spans.record(f"{spec.backend}:{spec.group_name}", self._metadata, CallStats(
                layer=layer, tokens=tokens, bytes_received=body.numel(), bytes_sent=reply.numel(),
                compute_seconds=compute, start_ns=start_ns, end_ns=time.time_ns(),
                error=text.decode(errors="replace") or None))

    def _beat(self) -> None:
        """While a block computes, a BEAT every heartbeat_ms (the router's bounded wait restarts on each): the
        thread ticks at half that, so the router sees a message at most ~1.5 x heartbeat_ms apart, and its own
        thread keeps beating through a long forward (torch ops release the GIL)."""
        every = self.spec.heartbeat_ms / 1000
        last = 0.0  # when the latest beat went out
        while not self._stop.wait(every / 2):
            with self._lock:
                busy, now = self._busy, time.monotonic()
                if busy is not None and now - max(busy[2], last) >= every:
                    try:
                        self._send(dist_wire.header(dist_wire.BEAT, busy[0], busy[1], 0), dist_wire.REPLY)
                    except RuntimeError:
                        return  # the serving thread sees the same failure and ends the membership
                    last = now

    def close(self) -> None:
        self._stop.set()

    def abort(self) -> None:
        """Ends the membership: NCCL kernels still waiting for a router that is gone are aborted (they would spin
        on the GPU forever). gloo is only marked ended: its abort would not wake the serving thread's receive, which
        the router closing its sockets (or dying) fails anyway."""
        self.close()
        if self.spec.backend == "nccl":
            dist_wire.abort(self._group)


class DistServer:
    """The shard's memberships; join() is called from the JoinGroup RPC (off the event loop: it blocks)."""

    def __init__(self, shard: ExpertShard, dtype: str, tracer=None) -> None:
        self._shard, self._dtype = shard, dtype
        self.tracer = tracer  # of the "expert.step" spans (None: the process's, moemesh.expert)
        self._members: list[Member] = []

    def refusal(self, spec: JoinSpec) -> str | None:
        """Why this shard cannot join as asked, or None."""
        if spec.backend not in dist_wire.BACKENDS:
            return f"backend {spec.backend!r} is not one of {', '.join(dist_wire.BACKENDS)}"
        if spec.backend == "nccl" and (self._shard.device.type != "cuda" or not dist.is_nccl_available()):
            return f"backend nccl needs a CUDA shard with NCCL; this shard runs on {self._shard.device}"
        if spec.backend == "gloo" and not dist.is_gloo_available():
            return "backend gloo is not available in this torch build"
        if spec.dtype != self._dtype:
            return f"dtype {spec.dtype!r} is not this shard's compute dtype {self._dtype!r}"
        if spec.hidden_size != self._shard.hidden_size or spec.hidden_size % 2:
            return f"hidden_size {spec.hidden_size} is not this shard's model's {self._shard.hidden_size} (even)"
        if spec.top_k < 1 or not 1 <= spec.rank < spec.world_size:
            return f"top_k {spec.top_k} must be >= 1 and rank {spec.rank} in 1..{spec.world_size - 1}"
        return None

    def join(self, spec: JoinSpec) -> str | None:
        """Joins and starts serving; returns None when a member, else the reason."""
        reason = self.refusal(spec)
        if reason is not None:
            return reason
        timeout = datetime.timedelta(milliseconds=max(spec.timeout_ms, 1))
        try:
            host, port = dist_wire.split_address(spec.store_address)
            store = dist.TCPStore(host, port, spec.world_size, False, timeout=timeout)
            group = dist_wire.form_group(store, spec.group_name, spec.rank, spec.world_size, spec.backend,
                                         dist_wire.local_ip_towards(host), timeout.total_seconds())
        except (RuntimeError, OSError, ValueError) as exc:
            return (f"cannot join {spec.backend} group {spec.group_name} at rendezvous {spec.store_address}: "
                    f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}")
        device = self._shard.device if spec.backend == "nccl" else torch.device("cpu")
        if device.type == "cuda" and device.index is None:  # "cuda": set_device needs the index (NCCL's device)
            device = torch.device("cuda", torch.cuda.current_device())
        self._members = [m for m in self._members if m.alive]
        spans = StepSpans(self.tracer or default_tracer("moemesh.expert"))
        self._members.append(Member(self._shard, group, spec, device, spans))
        log.info("joined %s group %s as rank %d of %d (rendezvous %s)", spec.backend, spec.group_name, spec.rank,
                 spec.world_size, spec.store_address)
        return None

    def watch_ended(self, group_name: str) -> None:
        """The router's Watch of group_name ended (it dropped the group, or died): that membership ends too.
        Aborted on a thread of its own: the caller is the event loop, and an NCCL abort may take a while."""
        for member in self._members:
            if member.spec.group_name == group_name and member.alive:
                log.info("%s group %s: the router's watch ended; leaving the group", member.spec.backend, group_name)
                threading.Thread(target=member.abort, name=f"dist-abort-{group_name}", daemon=True).start()

    def close(self) -> None:
        for member in self._members:
            member.close()
        self._members.clear()
