"""The router's end of one expert shard's shared-memory link (layout and signals: moemesh/serving/shm_region.py).

attach(max_tokens): create the region and a listening abstract UNIX socket, ask the shard over gRPC (Expert/Attach) to
map the region and connect, accept, then unlink the file (both sides keep their mappings). write() puts the layer's
inputs into the region, signal() sends the message (start() = both); wait() blocks in recv (the router's CPU is idle
meanwhile) for the reply with the same seq and returns a view of the output rows; wait(spin_s=) first polls the
region's reply word that long (shm_region: for a reply due any moment, e.g. the second shard's after the first's).
Faults: EOF (the shard died), a heartbeat that stops for stall_timeout (the shard hangs), or call_timeout in all ->
ExpertCallError (UNAVAILABLE) and the link closes; the dispatch re-attaches later. A long step on a live shard is not
a stall: its heartbeat thread keeps beating.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import grpc
import torch

from moemesh.serving import shm_region
from moemesh.v1 import expert_pb2
from services.router.expert_client import ExpertCallError, GrpcShardClient

_IDS = itertools.count()


class AttachRefused(Exception):
    """The shard answered Attach with ok=false (another host, a size or dtype mismatch): use gRPC instead."""


class ShmLink:
    kind = "shm"  # the transport name in Router.Info

    def __init__(self, client: GrpcShardClient, *, hidden_size: int, top_k: int, dtype: str,
                 stall_timeout: float = 1.0, call_timeout: float = 30.0) -> None:
        self.client, self.address = client, client.address
        self.hidden_size, self.top_k, self.dtype = hidden_size, top_k, dtype
        self.stall_timeout, self.call_timeout = stall_timeout, call_timeout
        self.region: shm_region.Region | None = None
        self._sock: socket.socket | None = None

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
        # recv wakes at least every stall_timeout/4 to look at the heartbeat; no busy wait.
        shm_region.set_timeout(sock, max(self.stall_timeout / 4, 0.01))
        self.region, self._sock = region, sock

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
        start = time.monotonic()
        beat, beat_at = int(self.region.beats[0]), start
        while True:
            try:
                message = shm_region.recv_message(self._sock)
            except TimeoutError:
                now = time.monotonic()
                seen = int(self.region.beats[0])
                if seen != beat:
                    beat, beat_at = seen, now
                elif now - beat_at > self.stall_timeout:
                    self._fail(layer, f"stalled: no heartbeat for {now - beat_at:.1f} s (stall timeout "
                                      f"{self.stall_timeout} s)")
                if now - start > self.call_timeout:
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
            return self.region.rows(tokens)[3]

    def _fail(self, layer: int, why: str):
        self.close()
        raise ExpertCallError(self.address, layer, grpc.StatusCode.UNAVAILABLE, f"shm: {why}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the shard's serving thread sees EOF and unmaps
        self._sock = self.region = None
