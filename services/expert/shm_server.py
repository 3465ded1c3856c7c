"""The shard side of the shared-memory data plane (moemesh/serving/shm_region.py): one attachment per router.

Attach maps the router's region, connects to its signalling socket and starts two threads (not the asyncio loop: torch
compute would block it): `serve` waits in a blocking recv for (seq, layer, T), runs ExpertShard.forward on the
region's rows 0..T-1, writes the output in place and replies; `beat` bumps the heartbeat words (counter and monotonic
time, every shm_region.HEARTBEAT_S) so the router can tell a long step (beats go on) from a stalled process (beats
stop). With spin_s > 0 (config `spin_us`), `serve` first polls the region's request word for that long after each
reply before it blocks (see shm_region); every attachment of the shard stops polling once a second router attaches
(M:N: the routers need those cores). An attachment lives until its socket closes (the router closed it,
re-attached with a bigger region, or died) or the shard stops.

M:N: several routers (data-parallel replicas) attach to one shard, one attachment each. The attachments share one
MergedCompute (services/expert/merged_compute.py): one forward at a time per shard, and blocks of the same layer that
wait at the same time (from different routers) run as one expert batch. Each router's tokens are counted under its pid
(moemesh_expert_router_tokens_total{router}).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass

import torch

from moemesh.serving import shm_region
from moemesh.serving.telemetry import tracer
from services.expert import metrics
from services.expert.merged_compute import MergedCompute
from services.expert.shard import ExpertShard
from services.expert.step_spans import CallStats, StepSpans

log = logging.getLogger("services.expert.shm")


@dataclass(frozen=True)
class AttachSpec:
    """What the router asks for (mirrors moemesh.v1.AttachRequest)."""

    shm_path: str
    max_tokens: int
    hidden_size: int
    top_k: int
    dtype: str
    socket_path: str
    host_id: str


class Attachment:
    def __init__(self, shard: ExpertShard, region: shm_region.Region, sock: socket.socket, name: str,
                 compute: MergedCompute | None = None, spin_s: float = 0.0) -> None:
        self._shard, self._region, self._sock, self.name = shard, region, sock, name
        self._compute = compute or MergedCompute(shard)  # shared by the shard's attachments (M:N)
        self._spin_s = spin_s
        self.router = peer_pid(sock)
        self._tokens = metrics.ROUTER_TOKENS.labels(self.router)  # bound once (labels() per layer is a lookup)
        self._timeout: float | None = None  # the socket's kernel timeout (shm_region.set_timeout)
        shm_region.set_timeout(sock, None)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, name=f"shm-serve-{name}", daemon=True),
                         threading.Thread(target=self._beat, name=f"shm-beat-{name}", daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return not self._stop.is_set()

    def stop_spinning(self) -> None:
        """Blocks at once after each reply from now on (read by the serving thread before its next wait)."""
        self._spin_s = 0.0

    def _beat(self) -> None:
        # Its own thread, not the serving one: a long forward keeps beating (torch ops release the GIL).
        shm_region.beat(self._region.beats)
        while not self._stop.wait(shm_region.HEARTBEAT_S):
            shm_region.beat(self._region.beats)

    def _receive(self, spans: StepSpans, last_seq: int) -> tuple | None:
        """The next message (after polling the request word for spin_s, if set); while a step span is open, wakes
        every idle_s to end it once the router is idle."""
        if self._spin_s:
            shm_region.spin_while(self._region.beats, shm_region.REQUEST_WORD, last_seq, self._spin_s)
        while True:
            timeout = spans.idle_s if spans.open_count else None
            if timeout != self._timeout:  # a system call: only on a change
                shm_region.set_timeout(self._sock, timeout)
                self._timeout = timeout
            try:
                return shm_region.recv_message(self._sock)
            except TimeoutError:
                spans.sweep()

    def _serve(self) -> None:
        region, spans, metadata, peer = self._region, StepSpans(tracer("moemesh.expert")), {}, f"shm:{self.name}"
        seq = int(region.beats[shm_region.REQUEST_WORD])
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    message = self._receive(spans, seq)
                    if message is None:
                        break  # the router closed the link (or died)
                    seq, layer, tokens, _, headers = message
                    if headers:  # first call of a router step: its trace context (see ShmDispatch.submit)
                        metadata = dict(line.split("=", 1) for line in headers.splitlines() if "=" in line)
                    status, text, start_ns, compute = 0, "", time.time_ns(), 0.0
                    try:  # output rows written in place; compute: its batch's time (no wait for another router)
                        compute = self._compute.forward(layer, *region.rows(tokens))
                    except Exception as exc:  # reported to the router, which fails the step
                        status, text = 1, f"{type(exc).__name__}: {exc}"
                    shm_region.send_message(self._sock, seq, layer, tokens, status, text)
                    region.beats[shm_region.REPLY_WORD] = seq  # after the message (a hint: see shm_region)
                    # Bookkeeping after the reply: the router is not kept waiting for it.
                    metrics.observe_forward(layer, tokens, 0, 0, compute, status == 0)
                    self._tokens.inc(tokens if status == 0 else 0)
                    spans.record(peer, metadata, CallStats(
                        layer=layer, tokens=tokens, bytes_received=0, bytes_sent=0, compute_seconds=compute,
                        start_ns=start_ns, end_ns=time.time_ns(), error=text or None))
        except OSError as exc:
            log.info("shm link %s closed: %s", self.name, exc)
        finally:
            spans.close()
            self.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the serving thread's recv
        except OSError:
            pass
        self._sock.close()


class ShmServer:
    """The shard's attachments; attach() is called from the Attach RPC (off the event loop: connect blocks)."""

    def __init__(self, shard: ExpertShard, dtype: str, spin_s: float = 0.0) -> None:
        self._shard, self._dtype, self.spin_s = shard, dtype, spin_s
        self._attachments: list[Attachment] = []
        self._count = 0
        self.compute = MergedCompute(shard)  # one forward at a time, same-layer blocks of several routers merged

    def refusal(self, spec: AttachSpec) -> str | None:
        """Why this shard cannot serve the request over shared memory, or None."""
        here = shm_region.host_id()
        if spec.host_id != here:
            return f"the router runs on host {spec.host_id!r}, this shard on {here!r}"
        if spec.dtype != self._dtype:
            return f"dtype {spec.dtype!r} is not this shard's compute dtype {self._dtype!r}"
        if spec.hidden_size != self._shard.hidden_size:
            return f"hidden_size {spec.hidden_size} is not this shard's model's {self._shard.hidden_size}"
        if spec.top_k < 1 or spec.max_tokens < 1:
            return f"top_k {spec.top_k} and max_tokens {spec.max_tokens} must be >= 1"
        return None

    def attach(self, spec: AttachSpec) -> str | None:
        """Maps and connects; returns None when attached, else the reason."""
        reason = self.refusal(spec)
        if reason is not None:
            return reason
        layout = shm_region.Layout(spec.max_tokens, spec.hidden_size, spec.top_k, spec.dtype)
        try:
            region = shm_region.Region(spec.shm_path, layout, create=False)
        except (OSError, ValueError, RuntimeError) as exc:
            return f"cannot map {spec.shm_path}: {exc}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5.0)
        try:
            sock.connect(shm_region.socket_address(spec.socket_path))
        except OSError as exc:
            sock.close()
            return f"cannot connect to the router's socket {spec.socket_path}: {exc}"
        self._count += 1
        self._attachments = [a for a in self._attachments if a.alive]
        attachment = Attachment(self._shard, region, sock, f"{self._count}", self.compute, self.spin_s)
        if {a.router for a in self._attachments} - {attachment.router}:  # M:N (a re-attach keeps its router pid)
            for other in [*self._attachments, attachment]:  # several routers' pollers would take the routers' cores
                other.stop_spinning()
        self._attachments.append(attachment)
        log.info("shm attached: %s, %d tokens x H %d x K %d %s", spec.shm_path, spec.max_tokens, spec.hidden_size,
                 spec.top_k, spec.dtype)
        return None

    def close(self) -> None:
        for attachment in self._attachments:
            attachment.close()
        self._attachments.clear()


def peer_pid(sock: socket.socket) -> str:
    """The connected router's pid (SO_PEERCRED of the Unix socket), as a label; "unknown" where unsupported."""
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return "unknown"
    return str(pid)
