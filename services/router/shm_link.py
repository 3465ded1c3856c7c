"""The router's end of one expert shard's shared-memory link (layout and signals: moemesh/serving/shm_region.py).

attach(max_tokens): create the region and a listening abstract UNIX socket, ask the shard over gRPC (Expert/Attach) to
map the region and connect, accept, then unlink the file (both sides keep their mappings). write() puts the layer's
inputs into the region, signal() sends the message (start() = both); wait() blocks in recv (the router's CPU is idle
meanwhile) for the reply with the same seq and returns a view of the output rows; wait(spin_s=) first polls the
region's reply word that long (shm_region: for a reply due any moment, e.g. the second shard's after the first's).
Faults: EOF (the shard died), a heartbeat that stops for stall_timeout (the shard hangs), or call_timeout in all ->
ExpertCallError (UNAVAILABLE) and the link closes; the dispatch re-attaches later. A long step on a live shard is not
a stall: its heartbeat thread keeps beating. While it waits, the receive wakes every stall_timeout/10 and reads the
age of the shard's latest beat from the region (the shard writes its monotonic time; same host, same clock), so
the step fails within about one poll of the deadline once the block is overdue for its size (a decode block: at
once; a long prefill block: later) and the shard process has no thread running or waiting for a CPU (stopped, or
hung; a starved one is left to call_timeout); services/router/stall_deadline.py says when silence counts.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import grpc
import torch

from moemesh.serving import shm_region
from moemesh.v1 import expert_pb2
from services.router import stall_deadline
from services.router.expert_client import ExpertCallError, GrpcShardClient

_IDS = itertools.count()


class AttachRefused(Exception):
    """The shard answered Attach with ok=false (another host, a size or dtype mismatch): use gRPC instead."""


class ShmLink:
    kind = "shm"  # the transport name in Router.Info

    def __init__(self, client: GrpcShardClient, *, hidden_size: int, top_k: int, dtype: str,
                 stall_timeout: float = stall_deadline.DEFAULT_S, call_timeout: float = 30.0) -> None:
        self.client, self.address = client, client.address
        self.hidden_size, self.top_k, self.dtype = hidden_size, top_k, dtype
        self.stall_timeout, self.call_timeout = stall_timeout, call_timeout
        self._judge, self.pace = stall_deadline.StallJudge(stall_timeout), stall_deadline.BlockPace()
        self._beat = (0, 0.0)  # (counter, when seen): the beat clock of a shard that writes no beat time
        self.region: shm_region.Region | None = None
        self._sock: socket.socket | None = None
        self.pid = 0  # the shard process's (SO_PEERCRED; 0: unknown), whose kernel state tells starved from stopped

    @property
    def attached(self) -> bool:
        return self._sock is not None

    @property
    def max_tokens(self) -> int:
        return self.region.layout.max_tokens if self.region is not None else 0

    def attach(self, max_tokens: int, rpc_timeout: float = 5.0) -> None:
        """Creates the region and connects; AttachRefused with the shard's reason, ExpertCallError when the shard
        does not answer."""
        self.close()
        name = f"moemesh-{os.getpid()}-{next(_IDS)}"
        layout = shm_region.Layout(max_tokens, self.hidden_size, self.top_k, self.dtype)
        region = shm_region.Region(shm_region.SHM_DIR / name, layout, create=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(shm_region.socket_address(f"@{name}"))
            listener.listen(1)
            request = expert_pb2.AttachRequest(
                shm_path=str(region.path), max_tokens=max_tokens, hidden_size=self.hidden_size, top_k=self.top_k,
                dtype=self.dtype, socket_path=f"@{name}", host_id=shm_region.host_id())
            try:
                reply = self.client.attach(request, timeout=rpc_timeout)
            except grpc.RpcError as exc:
                raise ExpertCallError(self.address, -1, exc.code(), f"Attach: {exc.details()}") from None
            if not reply.ok:
                raise AttachRefused(reply.reason)
            listener.settimeout(rpc_timeout)
            try:
                sock, _ = listener.accept()  # the shard connected before answering
            except OSError as exc:
                raise AttachRefused(f"the shard did not connect to {name}: {exc}") from None
        finally:
            listener.close()
            region.unlink()  # mapped on both sides (or given up): the name is no longer needed
        # recv wakes every poll_s (stall_timeout/10) while it waits, to look at the heartbeat; no busy wait.
        shm_region.set_timeout(sock, self._judge.poll_s)
        self.region, self._sock, self._beat = region, sock, (0, 0.0)
        try:
            self.pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except (OSError, AttributeError):
            self.pid = 0

    def start(self, seq: int, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, trace_context: str = "") -> None:
        """write() then signal()."""
        self.write(hidden, topk_ids, topk_weights)
        self.signal(seq, layer, hidden.shape[0], trace_context)

    def write(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Writes rows 0..T-1 of the inputs (hidden [T, H], topk_ids [T, K] int64, topk_weights [T, K])."""
        rows = self.region.rows(hidden.shape[0])
        rows[0].copy_(hidden)
        rows[1].copy_(topk_ids)
        rows[2].copy_(topk_weights)

    def signal(self, seq: int, layer: int, tokens: int, trace_context: str = "") -> None:
        """Tells the shard the inputs are there (with the step's trace context on its first layer)."""
        try:
            shm_region.send_message(self._sock, seq, layer, tokens, 0, trace_context)
        except OSError as exc:
            self._fail(layer, f"signal failed ({exc}); did the shard process exit?")
        self.region.beats[shm_region.REQUEST_WORD] = seq  # after the message: a hint for a polling shard

    def wait(self, seq: int, layer: int, tokens: int, spin_s: float = 0.0) -> torch.Tensor:
        """Blocks until the shard's reply to `seq` (polling the reply word for spin_s first); returns the output rows
        [T, H] (a view: use before the next start)."""
        if spin_s:
            shm_region.spin_until(self.region.beats, shm_region.REPLY_WORD, seq, spin_s)
        start, judged = time.monotonic(), False
        while True:
            try:
                message = shm_region.recv_message(self._sock)
            except TimeoutError:
                if not judged:  # the first look of this wait (a decode layer's reply mostly comes before any)
                    self._judge.reset()
                    judged = True
                waited = time.monotonic() - start
                silence = self._judge.stalled(self._last_beat(), waited > self.pace.overdue_after(tokens))
                if silence is not None and not stall_deadline.runnable(self.pid):  # starved: --expert-timeout
                    self._fail(layer, f"stalled: no heartbeat for {silence:.2f} s (stall timeout "
                                      f"{self.stall_timeout} s) and no reply for {waited:.2f} s")
                if waited > self.call_timeout:
                    self._fail(layer, f"no reply within {self.call_timeout} s")
                continue
            except OSError as exc:
                self._fail(layer, f"link error: {exc}")
            if message is None:
                self._fail(layer, "the shard closed the shared-memory link (process exited?)")
            got_seq, _, _, status, text = message
            if got_seq != seq:
                continue  # the reply to a request of a step that failed earlier
            if status:
                raise ExpertCallError(self.address, layer, grpc.StatusCode.FAILED_PRECONDITION, text)
            if tokens >= stall_deadline.PACE_MIN_TOKENS:  # a prefill-sized block: how long such blocks take here
                self.pace.observe(time.monotonic() - start, tokens)
            return self.region.rows(tokens)[3]

    def _last_beat(self) -> float:
        """time.monotonic() of the shard's latest beat: the time it wrote, else when its counter was seen to move."""
        words = self.region.beats
        written = int(words[shm_region.BEAT_TIME_WORD])
        if written:
            return written / 1e9
        count, now = int(words[0]), time.monotonic()
        if count != self._beat[0] or not self._beat[1]:
            self._beat = (count, now)
        return self._beat[1]

    def _fail(self, layer: int, why: str):
        self.close()
        raise ExpertCallError(self.address, layer, grpc.StatusCode.UNAVAILABLE, f"shm: {why}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the shard's serving thread sees EOF and unmaps
        self._sock = self.region = None
