"""CudaIpcDispatch: expert shards on the router's own GPU, over device buffers shared by CUDA IPC (transport
"cuda_ipc"; buffers and flags: moemesh/serving/cuda_ipc.py, shard side: services/expert/cuda_ipc_server.py).

Per MoE layer, submit copies hidden/ids/weights into each shard's region and enqueues flags_in[l] = 1; collect
enqueues the wait for flags_out[l] == 1, resets it and sums the shards' output rows. Nothing waits on the host, so
the dispatch is `capturable` when the driver captures stream memory operations: the router's decode steps stay
CUDA graphs. Once per *executed* forward the shard is told the step's rows (socket message, answered once the
shard has enqueued its side; the router does not wait for that answer: the shard may first drain its stream,
which needs the router's queued work to run):
  - an eager forward (prefill, warm-up before a capture, decode without graphs) announces itself at its first MoE
    layer's submit (the current stream is not capturing);
  - a graph replay cannot announce itself, so end_step announces it: a step in which the dispatch saw no eager
    forward, or saw a capture, ran exactly one replay (DecodeRunner: replay, or warm-ups + capture + replay).
A step that raised marks the links broken; begin_step re-attaches fresh regions (the shard drops the old one).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
from collections.abc import Sequence

import grpc
import torch

from moemesh.runtime.dispatch import Dispatch
from moemesh.serving import cuda_ipc, shm_region
from moemesh.v1 import expert_pb2
from services.router.expert_client import ExpertCallError, GrpcShardClient
from services.router.placement import Placement

log = logging.getLogger("services.router.cuda_ipc")
_IDS = itertools.count()
MAX_TOKENS = 8192  # rows per region: the largest step (batcher max_step_tokens, or a decode bucket) must fit
STEP = 0  # = services.expert.cuda_ipc_server.STEP


def refusal(router_device: str, shards: Sequence[tuple[str, str]], local: Sequence[bool]) -> str | None:
    """Why cuda_ipc cannot serve these shards [(address, device)], or None: every shard on this host and on the
    router's GPU (pure: tested on CPU)."""
    if torch.device(router_device).type != "cuda":
        return f"the router runs on {router_device}, not a GPU"
    if not shards:
        return "no expert shards"
    mine = cuda_ipc.normalize_device(router_device)
    for (address, device), here in zip(shards, local):
        if not here:
            return f"expert shard {address} is on another host"
        if not device.startswith("cuda") or cuda_ipc.normalize_device(device) != mine:
            return f"expert shard {address} computes on {device or '?'}, the router on {mine}"
    return None


class CudaIpcLink:
    """One shard's region and signalling socket."""

    def __init__(self, client: GrpcShardClient, *, num_layers: int, hidden_size: int, top_k: int, dtype: str,
                 device: torch.device, graphs: bool, call_timeout: float) -> None:
        self.client, self.address = client, client.address
        self.layout = shm_region.Layout(MAX_TOKENS, hidden_size, top_k, dtype)
        self.num_layers, self.device, self.graphs, self.call_timeout = num_layers, device, graphs, call_timeout
        self.region: cuda_ipc.DeviceRegion | None = None
        self._sock: socket.socket | None = None
        self._seq, self._pending = 0, 0  # announcements sent, answers not read yet

    @property
    def attached(self) -> bool:
        return self._sock is not None

    def attach(self, rpc_timeout: float = 30.0) -> None:
        """New region + socket; ConnectionError with the shard's reason when it refuses or does not answer."""
        self.close()
        region = cuda_ipc.DeviceRegion.create(self.layout, self.num_layers, self.device)
        h = region.share()
        name = f"moemesh-ipc-{os.getpid()}-{next(_IDS)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(shm_region.socket_address(f"@{name}"))
            listener.listen(1)
            request = expert_pb2.AttachRequest(
                max_tokens=MAX_TOKENS, hidden_size=self.layout.hidden_size, top_k=self.layout.top_k,
                dtype=self.layout.dtype, socket_path=f"@{name}", host_id=shm_region.host_id(),
                cuda_ipc=expert_pb2.CudaIpcRegion(
                    device=h.device, memory_handle=h.handle, size_bytes=h.size_bytes, offset_bytes=h.offset_bytes,
                    ref_counter_handle=h.ref_counter_handle, ref_counter_offset=h.ref_counter_offset,
                    event_handle=h.event_handle or b"", event_sync_required=h.event_sync_required,
                    num_layers=self.num_layers, graphs=self.graphs))
            try:
                reply = self.client.attach(request, timeout=rpc_timeout)
            except grpc.RpcError as exc:
                raise ConnectionError(f"Attach: {exc.code().name}: {exc.details()}") from None
            if not reply.ok:
                raise ConnectionError(f"refused: {reply.reason}")
            listener.settimeout(rpc_timeout)
            sock, _ = listener.accept()
        finally:
            listener.close()
        sock.settimeout(self.call_timeout)
        self.region, self._sock, self._pending = region, sock, 0

    def announce(self, tokens: int) -> None:
        """Tells the shard that a forward of `tokens` rows runs now (its answer is read later by drain())."""
        self._seq += 1
        try:
            shm_region.send_message(self._sock, self._seq, STEP, tokens)
        except OSError as exc:
            self._fail(f"signal failed ({exc}); did the shard process exit?")
        self._pending += 1

    def drain(self) -> None:
        """Reads the answers that arrived; ExpertCallError for a step the shard failed or a closed link."""
        while self._pending:
            self._sock.settimeout(0.0)
            try:
                message = shm_region.recv_message(self._sock)
            except (BlockingIOError, TimeoutError):
                return
            except OSError as exc:
                self._fail(f"link error: {exc}")
            finally:
                if self._sock is not None:
                    self._sock.settimeout(self.call_timeout)
            if message is None:
                self._fail("the shard closed the link (process exited?)")
            self._pending -= 1
            if message[3]:
                self.close()
                raise ExpertCallError(self.address, -1, grpc.StatusCode.FAILED_PRECONDITION,
                                      f"cuda_ipc: {message[4]}")

    def _fail(self, why: str):
        self.close()
        raise ExpertCallError(self.address, -1, grpc.StatusCode.UNAVAILABLE, f"cuda_ipc: {why}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None  # the region stays referenced until a new attach (queued device work may still use it)


class CudaIpcDispatch(Dispatch):
    def __init__(self, links: list[CudaIpcLink], placement: Placement, moe_layers: Sequence[int],
                 capturable: bool) -> None:
        self.links, self.placement, self.capturable = links, placement, capturable
        # Steps launched ahead (runtime/step_ahead.py) queue their announcements, flags and copies in stream order
        # behind the running step's, on both sides; a shard's failure fails the next begin_step as before.
        self.steps_ahead = capturable
        self._first = min(moe_layers)
        self._of_layer = {layer: placement.shards_for_layer(layer) for layer in moe_layers}
        self._tokens, self._eager, self._captured = 0, 0, False

    def transports(self) -> list[str]:
        return ["cuda_ipc" if link.attached else "cuda_ipc-down" for link in self.links]

    def begin_step(self, tokens: int) -> None:
        self._tokens, self._eager, self._captured = tokens, 0, False
        for link in self.links:
            if link.attached:
                link.drain()  # a failure the shard reported for an earlier step fails this one
            if not link.attached:
                try:
                    link.attach()
                except (ConnectionError, OSError, RuntimeError) as exc:
                    raise ExpertCallError(link.address, -1, grpc.StatusCode.UNAVAILABLE,
                                          f"cuda_ipc re-attach: {exc}") from None
                log.info("expert shard %s: cuda_ipc re-attached", link.address)

    def end_step(self) -> None:
        if sys.exc_info()[0] is not None:  # the forward raised: queued flags may be out of step with the shard
            for link in self.links:
                link.close()
            return
        if self._eager == 0 or self._captured:  # a graph replay ran (see the module doc)
            for link in self.links:
                link.announce(self._tokens)

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> tuple[int, int]:
        # hidden [T, H]; topk_ids [T, K] int64 (-1 unused); topk_weights [T, K] float32
        tokens = hidden.shape[0]
        if layer == self._first:
            if torch.cuda.is_current_stream_capturing():
                self._captured = True
            else:
                self._eager += 1
                for link in self.links:
                    link.announce(tokens)
        for i in self._of_layer[layer]:
            r = self.links[i].region
            r.hidden[:tokens].copy_(hidden)
            r.ids[:tokens].copy_(topk_ids)
            r.weights[:tokens].copy_(topk_weights)
            cuda_ipc.write_flag(r.flags_in[layer], 1)
        return layer, tokens

    def collect(self, handle: tuple[int, int]) -> torch.Tensor:
        layer, tokens = handle
        out = None  # [T, H]
        for i in self._of_layer[layer]:
            r = self.links[i].region
            cuda_ipc.wait_flag(r.flags_out[layer], 1)
            cuda_ipc.write_flag(r.flags_out[layer], 0)
            part = r.output[:tokens]
            out = part if out is None else (out.float() + part.float())
        return out.to(self.links[0].region.output.dtype)

    def close(self) -> None:
        for link in self.links:
            link.close()


def start(clients: Sequence[GrpcShardClient], placement: Placement, *, mode: str, device: str, spec, local,
          call_timeout: float) -> CudaIpcDispatch | None:
    """The cuda_ipc dispatch when every shard is on this GPU and attaches; None (reason logged) to fall back;
    ConnectionError naming the shard when mode is "cuda_ipc" and it cannot be used."""
    reason = refusal(device, [(c.address, c.info.device) for c in clients], local)
    links: list[CudaIpcLink] = []
    if reason is None:
        dev = torch.device(cuda_ipc.normalize_device(device))
        graphs_off = cuda_ipc.graphs_refusal(dev)
        if graphs_off:
            log.warning("cuda_ipc without CUDA graphs: %s", graphs_off)
        for client in clients:
            link = CudaIpcLink(client, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                               top_k=spec.moe.top_k, dtype=client.info.dtype, device=dev, graphs=not graphs_off,
                               call_timeout=call_timeout)
            try:
                link.attach()
            except (ConnectionError, OSError, RuntimeError) as exc:
                reason = f"expert shard {client.address}: {exc}"
                break
            links.append(link)
    if reason is not None:
        for link in links:
            link.close()
        if mode == "cuda_ipc":
            raise ConnectionError(f"cuda_ipc refused: {reason}")
        if torch.device(device).type == "cuda":
            log.warning("cuda_ipc not used (%s); falling back to the other transports", reason)
        return None
    for client in clients:
        log.info("expert shard %s: transport cuda_ipc (graphs %s)", client.address, "off" if graphs_off else "on")
    return CudaIpcDispatch(links, placement, spec.moe_layers, capturable=not graphs_off)
