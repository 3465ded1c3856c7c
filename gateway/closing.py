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
    """Set once the gateway drains; `guard(items)` passes a stream's items on until then."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._event.is_set()

    def begin(self, grace: float | None) -> None:
        """Called (in the loop) when draining starts: streams end MARGIN_S before the grace is over."""
        delay = max(0.0, (grace or 0.0) - MARGIN_S)
        asyncio.get_running_loop().call_later(delay, self._event.set)

    async def guard(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items of `items` until the gateway closes; then `items` is cancelled (its cleanup, the commit, runs)
        and GatewayClosing is raised."""
        source = aiter(items)
        closing = asyncio.ensure_future(self._event.wait())
        step: asyncio.Future | None = None
        try:
            while True:
                # The next item on a task of its own, so that the wait can end without it; the task runs in a copy
                # of this context (request scope, trace).
                step = asyncio.ensure_future(anext(source))
                done, _ = await asyncio.wait({step, closing}, return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    step.cancel()
                    with contextlib.suppress(BaseException):
                        await step
                    raise GatewayClosing()
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            closing.cancel()
            if step is not None and not step.done():  # our caller went away: so does the stream (and it commits)
                step.cancel()
