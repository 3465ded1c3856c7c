"""Ending the gateway's open streams in-band when it drains (no grpc here).

A drain gives in-flight calls `grace` seconds; a stream still open when the grace runs out would be cut by the
server, and a cut stream ends without a final event: Envoy's JSON transcoder drops a gRPC status that follows
streamed chunks, so an HTTP client would see neither an error event nor `data: [DONE]`. So shortly before the grace
is over the gateway ends such streams itself, with an in-band UNAVAILABLE error (the edge adds `[DONE]` after it);
the tokens already delivered are billed as for a cancelled request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from moemesh.errors import ErrorStatus, ServiceError

T = TypeVar("T")
# Streams end this long before the grace does: time to send the error and finish the call. Generous because a
# starved gateway (reniced front end on a busy host) runs its timers late: measured with 10 busy loops on 2 cores at
# nice 10, a cut due 4.5 s after the drain began came 5.8 s after it, when gRPC's grace (6 s) was nearly over.
MARGIN_S = 2.5


class GatewayClosing(ServiceError):
    status = ErrorStatus.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("the gateway is shutting down (a stop or a restart): the answer is cut here; retry the "
                         "request")


class Closing:
    """Set once the gateway drains; `guard(items)` passes a stream's items on until then.

    The items are read in the caller's own task (a task and an asyncio.wait per item cost the gateway ~0.1 ms of
    CPU per streamed token, a sixth of its share); the drain's timer cancels the tasks that wait for their next item
    (`_waiting`), and guard turns that one cancellation, which it asked for (`_cut`), into GatewayClosing. Any other
    cancellation (the caller went away) is the caller's and passes through. Either way the stream's own cleanup
    (where the commit runs) happens."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiting: set[asyncio.Task] = set()  # tasks inside guard, waiting for a stream's next item
        self._cut: set[asyncio.Task] = set()  # of those, the ones the drain cancelled

    @property
    def closed(self) -> bool:
        return self._event.is_set()

    def begin(self, grace: float | None) -> None:
        """Called (in the loop) when draining starts: streams end MARGIN_S before the grace is over."""
        delay = max(0.0, (grace or 0.0) - MARGIN_S)
        asyncio.get_running_loop().call_later(delay, self._close)

    def _close(self) -> None:
        self._event.set()
        for task in self._waiting:
            self._cut.add(task)
            task.cancel()

    async def guard(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items of `items` until the gateway closes; then `items` is cancelled (its cleanup, the commit, runs)
        and GatewayClosing is raised."""
        source, task = aiter(items), asyncio.current_task()
        try:
            while not self.closed:
                self._waiting.add(task)
                try:
                    item = await anext(source)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if task not in self._cut:
                        raise  # the caller's own cancellation
                    break
                finally:
                    self._waiting.discard(task)
                if task in self._cut:  # the source let the cancellation pass and gave an item: closing anyway
                    break
                yield item
        finally:  # our caller went away, or the gateway closes: so does the stream (and it commits)
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
        if task in self._cut:
            self._cut.discard(task)
            task.uncancel()
        raise GatewayClosing()
