"""Liveness of the expert shards of a process group through their control channel (Expert/Watch), for the router.

Why: a process-group data plane cannot always tell a dead or stalled peer from a slow one. gloo sees a killed peer
(its sockets close) and carries heartbeats, but an NCCL receive from a dead or stopped peer spins on the GPU until
the group's timeout, and a blocking NCCL wait that times out aborts and may take the router down. So every shard of
a group keeps one server-streaming Watch call open; its beats arrive on a reader thread, and the waiting thread asks
`GroupWatch.verdict()` between polls:

- the stream breaks (UNAVAILABLE, the shard's process exited and its sockets closed): dead at once;
- no beat for stall_s (the process is stopped, or so starved that it cannot answer): stalled, as judged by
  services/router/stall_deadline.py (which does not blame a shard for the router's own late checks).

The shard beats every stall_s / 6 from its event loop (not its compute thread), so a long block on a live shard does
not look stalled. Closing a GroupWatch cancels the calls; the shard then ends that membership (services/expert/
dist_server.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import grpc

from moemesh.v1 import expert_pb2
from services.router import stall_deadline

log = logging.getLogger("services.router.watch")


class ShardWatch:
    """One shard's Watch stream; `verdict()` is None while it beats, else why the shard counts as lost."""

    def __init__(self, client, group_name: str, stall_s: float, clock=time.monotonic) -> None:
        self.address, self.stall_s, self._clock = client.address, stall_s, clock
        self._judge = stall_deadline.StallJudge(stall_s, clock)
        interval_ms = max(10, int(stall_deadline.beat_s(stall_s) * 1000))
        self._call = client.watch(expert_pb2.WatchRequest(interval_ms=interval_ms, group_name=group_name))
        self._last = clock()  # the first beat is due within stall_s of the start too
        self._lost: str | None = None
        self._closed = False
        threading.Thread(target=self._read, name=f"watch-{client.address}", daemon=True).start()

    def _read(self) -> None:
        try:
            for _ in self._call:
                self._last = self._clock()
            why = "the shard ended its Watch stream"
        except grpc.RpcError as exc:
            why = f"control channel lost ({exc.code().name}: {exc.details()})"
        if not self._closed:
            self._lost = why
            log.warning("expert shard %s: %s", self.address, why)

    def verdict(self) -> str | None:
        if self._lost is not None:
            return self._lost
        silent = self._judge.stalled(self._last)
        if silent is not None:
            return f"stalled: no liveness beat for {silent:.2f} s (deadline {self.stall_s:.2f} s)"
        return None

    def close(self) -> None:
        self._closed = True
        self._call.cancel()


class GroupWatch:
    """The watches of every shard of one formation of a group."""

    def __init__(self, clients: Sequence, group_name: str, stall_s: float) -> None:
        self._watches: list[ShardWatch] = []
        try:
            for client in clients:
                self._watches.append(ShardWatch(client, group_name, stall_s))
        except BaseException:
            self.close()
            raise

    def verdict(self) -> tuple[str, str] | None:
        """(address, why) of the first lost shard, or None while every shard beats."""
        for watch in self._watches:
            why = watch.verdict()
            if why is not None:
                return watch.address, why
        return None

    def close(self) -> None:
        for watch in self._watches:
            watch.close()
        self._watches = []
