"""The shard side of the same-GPU data plane (moemesh/serving/cuda_ipc.py): one attachment per router.

Attach maps the router's device region (CUDA IPC), connects to its signalling socket and starts a serving thread.
Per executed router step the router sends one message (seq, STEP, T); the thread enqueues, on its own stream, for
every hosted MoE layer in order:

    wait flags_in[l] == 1 -> flags_in[l] = 0 -> bank.forward(l, hidden[:T], ids[:T], weights[:T]) -> output[:T]
    -> flags_out[l] = 1

and answers (seq, STEP, T, status) once enqueued (not computed: the GPU orders the rest; the router does not wait
for the answer, see cuda_ipc_dispatch.py). With graphs on, a step of T rows in a decode bucket replays a CUDA graph
of exactly that sequence (captured on first use); other T run eagerly.

First use of a T: the stream is drained and one layer runs on private scratch rows before any flag wait is queued.
Why: a kernel's first launch loads its module (Triton compiles one variant per T range; CUDA lazy loading), and a
module load may synchronize the whole context; with a cross-process flag wait pending on our stream that
synchronization would wait for the router, which may be waiting for us (measured: the first eager step deadlocked).
The same holds across attachments: a router with ping-pong micro-batches attaches twice, and one link's module load
would wait for the other link's pending flag wait (the ipc-1-pp hang of benchmarks/mesh_gpu.py). So before a link
serves, it warms every bucket and a spread of eager sizes (WARM_TOKENS) and captures its bucket graphs, one link at
a time (_PREPARE): the first link loads the process's modules while nothing waits, later links load none.
The thread exits when the socket closes (router closed the link or died) or the shard stops.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import torch

from moemesh.serving import cuda_ipc, shm_region
from services.expert import metrics

log = logging.getLogger("services.expert.cuda_ipc")
STEP = 0  # the message's layer field: a whole-step announcement
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # = moemesh.runtime.gpu.decode_graphs.BUCKETS (the router's decode rows)
# Eager sizes warmed before a link serves: each tuned-config range of fused_moe, and sizes not divisible by 16
# (Triton specializes integer arguments on divisibility by 16).
WARM_TOKENS = (3, 5, 17, 33, 65, 129, 256, 257, 1024, 1025, 4096, 4097)
_PREPARE = threading.Lock()  # one link of this process warms/captures at a time (see the module doc)
_WARM: set[int] = set()  # T whose kernels this process has loaded


class CudaIpcAttachment:
    def __init__(self, bank, region: cuda_ipc.DeviceRegion, sock: socket.socket, graphs: bool, name: str) -> None:
        self._bank, self._region, self._sock, self.name = bank, region, sock, name
        self._graphs_on = graphs
        self._layers = tuple(sorted(bank.layers))
        self._stream = torch.cuda.Stream(region.raw.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"cuda-ipc-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._stop.is_set()

    def _enqueue(self, tokens: int) -> None:
        """The step's layers on the current stream (see the module doc); no host sync."""
        r = self._region
        for layer in self._layers:
            cuda_ipc.wait_flag(r.flags_in[layer], 1)
            cuda_ipc.write_flag(r.flags_in[layer], 0)
            self._layer(layer, r.hidden[:tokens], r.ids[:tokens], r.weights[:tokens], r.output[:tokens])
            cuda_ipc.write_flag(r.flags_out[layer], 1)

    def _layer(self, layer: int, hidden, ids, weights, out) -> None:
        """hidden [T, H], ids [T, K] int32 global (-1 unused; the bank masks non-hosted), weights [T, K] -> out."""
        out.copy_(self._bank.forward(layer, hidden, ids.to(torch.int64), weights))

    def _warm_up(self, tokens: int) -> None:
        """Loads every kernel a step of T rows launches, with no flag wait pending (see the module doc)."""
        r = self._region
        self._stream.synchronize()
        hidden = torch.randn_like(r.hidden[:tokens])
        ids = torch.randint(0, self._bank.spec.num_experts, r.ids[:tokens].shape, device=hidden.device,
                            dtype=torch.int32)
        self._layer(self._layers[0], hidden, ids, torch.rand_like(r.weights[:tokens]), torch.empty_like(hidden))
        self._stream.synchronize()
        _WARM.add(tokens)

    def _prepare(self) -> None:
        """Before this link serves: kernels of every bucket and of WARM_TOKENS loaded, bucket graphs captured."""
        limit = self._region.layout.max_tokens
        with _PREPARE, torch.cuda.stream(self._stream):
            started = time.perf_counter()
            for tokens in (t for t in (*BUCKETS, *WARM_TOKENS) if t <= limit and t not in _WARM):
                self._warm_up(tokens)
            if self._graphs_on:
                for tokens in (t for t in BUCKETS if t <= limit):
                    self._graphs[tokens] = self._capture(tokens)
            log.info("cuda_ipc link %s ready in %.1f s (graphs %s)", self.name, time.perf_counter() - started,
                     sorted(self._graphs))

    def _capture(self, tokens: int) -> torch.cuda.CUDAGraph:
        """Warm-up on scratch rows (kernels of this T loaded), then capture _enqueue(T) on our stream. Not through
        `torch.cuda.graph`: its entry synchronizes the device and empties the cache (cudaFree), which would wait for
        another link's pending flag wait (the ping-pong hang); thread_local: that link may replay meanwhile."""
        if tokens not in _WARM:
            self._warm_up(tokens)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                self._enqueue(tokens)
            finally:
                graph.capture_end()
        return graph

    def _run(self, tokens: int) -> None:
        if tokens > self._region.layout.max_tokens:
            raise ValueError(f"step of {tokens} rows, the region holds {self._region.layout.max_tokens}")
        with torch.cuda.stream(self._stream):
            if self._graphs_on and tokens in BUCKETS:
                graph = self._graphs.get(tokens)
                if graph is None:
                    with _PREPARE:
                        graph = self._graphs[tokens] = self._capture(tokens)
                graph.replay()
            else:
                if tokens not in _WARM:
                    with _PREPARE:
                        self._warm_up(tokens)
                self._enqueue(tokens)

    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                self._prepare()
                while not self._stop.is_set():
                    message = shm_region.recv_message(self._sock)
                    if message is None:
                        break  # the router closed the link (or died)
                    seq, kind, tokens, _, _ = message
                    status, text, start = 0, "", time.perf_counter()
                    try:
                        if kind != STEP:
                            raise ValueError(f"unknown message kind {kind}")
                        self._run(tokens)
                    except Exception as exc:  # reported to the router, which fails the step
                        status, text = 1, f"{type(exc).__name__}: {exc}"
                        log.warning("cuda_ipc step of %d rows failed: %s", tokens, text)
                    metrics.observe_forward(-1, tokens, 0, 0, time.perf_counter() - start, status == 0)
                    shm_region.send_message(self._sock, seq, kind, tokens, status, text)
        except OSError as exc:
            log.info("cuda_ipc link %s closed: %s", self.name, exc)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def refusal(request, shard_device: str, dtype: str, hidden_size: int, layers: tuple[int, ...]) -> str | None:
    """Why this shard cannot serve the AttachRequest over CUDA IPC, or None (pure: tested on CPU)."""
    c = request.cuda_ipc
    here = shm_region.host_id()
    if request.host_id != here:
        return f"the router runs on host {request.host_id!r}, this shard on {here!r}"
    device = cuda_ipc.normalize_device(shard_device)
    if device != f"cuda:{c.device}":
        return f"the router's buffers are on cuda:{c.device}, this shard computes on {device}"
    if request.dtype != dtype:
        return f"dtype {request.dtype!r} is not this shard's compute dtype {dtype!r}"
    if request.hidden_size != hidden_size:
        return f"hidden_size {request.hidden_size} is not this shard's model's {hidden_size}"
    if request.top_k < 1 or request.max_tokens < 1:
        return f"top_k {request.top_k} and max_tokens {request.max_tokens} must be >= 1"
    if layers and max(layers) >= c.num_layers:
        return f"the flag block has {c.num_layers} layers, this shard hosts layer {max(layers)}"
    return None


def attach(bank, request, name: str) -> CudaIpcAttachment:
    """Maps the region and connects the socket (the caller checked refusal()); raises with the reason."""
    c = request.cuda_ipc
    layout = shm_region.Layout(request.max_tokens, request.hidden_size, request.top_k, request.dtype)
    handle = cuda_ipc.IpcHandle(c.device, c.memory_handle, c.size_bytes, c.offset_bytes, c.ref_counter_handle,
                                c.ref_counter_offset, c.event_handle, c.event_sync_required)
    torch.cuda.set_device(c.device)
    region = cuda_ipc.DeviceRegion.open(handle, layout, c.num_layers)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5.0)
    try:
        sock.connect(shm_region.socket_address(request.socket_path))
    except OSError as exc:
        sock.close()
        raise ConnectionError(f"cannot connect to the router's socket {request.socket_path}: {exc}") from None
    sock.settimeout(None)
    log.info("cuda_ipc attached: cuda:%d, %d tokens x H %d x K %d %s, graphs %s", c.device, request.max_tokens,
             request.hidden_size, request.top_k, request.dtype, c.graphs)
    return CudaIpcAttachment(bank, region, sock, c.graphs, name)
