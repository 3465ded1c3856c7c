"""Shared-memory expert data plane between a router and one expert shard process on the same host (CPU).

The region is one file under /dev/shm, mapped by both processes (torch.from_file, MAP_SHARED), holding:

    header  [8] int64      header[0]: the shard's heartbeat counter (a shard thread bumps it every HEARTBEAT_S);
                           header[1]: seq of the router's latest request, written after its message is sent;
                           header[2]: seq of the shard's latest reply, written after its message is sent;
                           header[3]: the shard's CLOCK_MONOTONIC time of its latest beat, in ns (same host, so
                           the router reads the beat's age directly; 0 from a shard that predates it)
    hidden  [Tmax, H]      dtype   router -> shard, rows 0..T-1 of the current layer
    ids     [Tmax, K]      int32   router -> shard, global expert ids (-1: unused slot)
    weights [Tmax, K]      float32 router -> shard
    output  [Tmax, H]      dtype   shard -> router, partial sum over the shard's hosted selected experts

Signalling is a UNIX SOCK_SEQPACKET connection carrying one MESSAGE struct per layer each way: the router sends
(seq, layer, T, 0) after writing the inputs (on a step's first layer followed by the step's W3C trace context as
"key=value" lines), the shard replies (seq, layer, T, status) after writing the output; status != 0 is followed by a
UTF-8 error text in the same packet. Both sides end a wait in a blocking recv, and a process that dies closes its end
(EOF at once). Invariant: the shard handles one message at a time, in order, so a reply with the router's latest seq
means the output rows are that request's (stale replies are skipped by seq).

Spinning (optional, bounded): a side that expects the other's message soon may first poll header[1] / header[2]
(`spin_while` / `spin_until`, yielding the core between reads) and only then recv. The words are hints written
after the message is sent, so a recv after a hit returns at once; the message stays the only synchronisation (its
system calls order the memory), so the words need no atomics. Why: on 2 quiet cores (router + 2 shards) one shard
that polls while the router computes streamed faster than blocking everywhere (ExpertConfig.spin_us auto; the raw
wake-up of a blocked process costs only ~5 us here, so the gain is the poller's core staying warm and unshared); the
router polls only for the replies after the first of a layer (services/router/shm_dispatch.py).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MESSAGE = struct.Struct("<QIIi")  # seq, layer, tokens, status (0 ok)
HEADER_WORDS = 8
REQUEST_WORD, REPLY_WORD = 1, 2  # header words: latest request seq (router), latest reply seq (shard)
BEAT_TIME_WORD = 3  # header word: time.monotonic_ns() of the shard's latest beat
HEARTBEAT_S = 0.05  # 12 beats per default stall deadline (services/router/stall_deadline.py)
SHM_DIR = Path("/dev/shm")
_ALIGN = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class Layout:
    """Sizes of the buffers; both sides compute the same offsets from them."""

    max_tokens: int
    hidden_size: int
    top_k: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("max_tokens", "hidden_size", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 1")

    def offsets(self) -> tuple[int, int, int, int, int]:
        """(hidden, ids, weights, output, total) byte offsets."""
        esize = DTYPES[self.dtype].itemsize
        rows_h, rows_k = self.max_tokens * self.hidden_size * esize, self.max_tokens * self.top_k * 4
        hidden = _aligned(HEADER_WORDS * 8)
        ids = hidden + _aligned(rows_h)
        weights = ids + _aligned(rows_k)
        output = weights + _aligned(rows_k)
        return hidden, ids, weights, output, output + _aligned(rows_h)


class Region:
    """The mapped buffers (views into one shared uint8 mapping); unmapped when the last view is dropped."""

    def __init__(self, path: str | Path, layout: Layout, *, create: bool) -> None:
        self.path, self.layout = Path(path), layout
        o_hidden, o_ids, o_weights, o_out, total = layout.offsets()
        if create:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, total)
            finally:
                os.close(fd)
        elif self.path.stat().st_size < total:
            raise ValueError(f"{self.path} holds {self.path.stat().st_size} bytes, the layout needs {total}")
        raw = torch.from_file(str(self.path), shared=True, size=total, dtype=torch.uint8)
        t, h, k, dtype = layout.max_tokens, layout.hidden_size, layout.top_k, DTYPES[layout.dtype]
        self.header = raw[:HEADER_WORDS * 8].view(torch.int64)  # [8]
        self.hidden = raw[o_hidden:o_hidden + t * h * dtype.itemsize].view(dtype).view(t, h)  # [Tmax, H]
        self.ids = raw[o_ids:o_ids + t * k * 4].view(torch.int32).view(t, k)  # [Tmax, K]
        self.weights = raw[o_weights:o_weights + t * k * 4].view(torch.float32).view(t, k)  # [Tmax, K]
        self.output = raw[o_out:o_out + t * h * dtype.itemsize].view(dtype).view(t, h)  # [Tmax, H]
        self.beats = self.header.numpy()  # the same words as a numpy array: reading one costs no torch op
        self._rows: dict[int, tuple[torch.Tensor, ...]] = {}

    def rows(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden, ids, weights, output) rows 0..tokens-1, views made once per row count (a decode step reuses
        the same few)."""
        views = self._rows.get(tokens)
        if views is None:
            if len(self._rows) > 64:
                self._rows.clear()
            views = self._rows[tokens] = (self.hidden[:tokens], self.ids[:tokens], self.weights[:tokens],
                                          self.output[:tokens])
        return views

    def unlink(self) -> None:
        """Removes the file; the mappings stay valid until dropped (done once both sides mapped it)."""
        self.path.unlink(missing_ok=True)


def beat(words) -> None:
    """One heartbeat into a numpy view of the header (a shard thread, every HEARTBEAT_S): the counter and the time."""
    words[0] += 1
    words[BEAT_TIME_WORD] = time.monotonic_ns()


def socket_address(name: str) -> str | bytes:
    """"@name" -> the Linux abstract socket b"\\0name" (no file to clean up); anything else is a filesystem path."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def host_id() -> str:
    """Hostname and kernel boot id: two processes that agree share /dev/shm and abstract UNIX sockets (unless in
    different network namespaces, which the Attach connect then reports)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def send_message(sock: socket.socket, seq: int, layer: int, tokens: int, status: int = 0, text: str = "") -> None:
    data = MESSAGE.pack(seq, layer, tokens, status) + text.encode()[:4000] if text else \
        MESSAGE.pack(seq, layer, tokens, status)
    try:  # one write(2): socket.send on a socket with a Python timeout polls first (a second system call)
        os.write(sock.fileno(), data)  # SOCK_SEQPACKET: the whole packet or an error
    except BlockingIOError:  # the peer's queue is full (it is not reading): wait as the socket's timeout allows
        sock.sendall(data)  # with set_timeout: raises once SO_SNDTIMEO passes again


def recv_message(sock: socket.socket) -> tuple[int, int, int, int, str] | None:
    """(seq, layer, tokens, status, text), or None on EOF (the peer closed or died); TimeoutError when the socket's
    timeout (set_timeout) passes first."""
    try:
        data = sock.recv(MESSAGE.size + 4096)
    except BlockingIOError:  # SO_RCVTIMEO expired on a blocking socket
        raise TimeoutError("no shm signal within the receive timeout") from None
    if not data:
        return None
    if len(data) < MESSAGE.size:
        raise ConnectionError(f"short shm signal packet ({len(data)} bytes)")
    seq, layer, tokens, status = MESSAGE.unpack_from(data)
    return seq, layer, tokens, status, data[MESSAGE.size:].decode(errors="replace")


def set_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Send and receive timeouts kept by the kernel (SO_SNDTIMEO, SO_RCVTIMEO; None: wait forever) on a blocking
    socket: a recv is then one system call (Python's own socket timeout polls first, a second call per message).
    A timeout shows as TimeoutError from recv_message and as an OSError from send_message."""
    sock.settimeout(None)
    micros = 0 if seconds is None else max(int(seconds * 1e6), 1)  # 0 = no timeout
    value = struct.pack("ll", micros // 1_000_000, micros % 1_000_000)  # struct timeval
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def spin_while(words, index: int, value: int, seconds: float) -> bool:
    """Polls words[index] (a numpy view of the header) while it equals `value`, yielding the core between reads
    (os.sched_yield also releases the GIL), for at most `seconds`; True once it differs."""
    if words[index] != value:
        return True
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        os.sched_yield()
        if words[index] != value:
            return True
    return False


def spin_until(words, index: int, value: int, seconds: float) -> bool:
    """Polls words[index] until it equals `value` (as spin_while), for at most `seconds`; True on a hit."""
    if words[index] == value:
        return True
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        os.sched_yield()
        if words[index] == value:
            return True
    return False
