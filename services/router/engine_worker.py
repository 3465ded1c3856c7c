"""The one thread that touches the Engine: steps, releases and info run there in arrival order.

Engine.step is synchronous torch code (and the engine is not thread-safe), so the event loop hands every engine
call to this thread. The caller's contextvars are copied into the call (loop.run_in_executor alone does not), so
the OTel span of the RPC is the parent of "router.step" and of the expert calls made from this thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class EngineWorker:
    def __init__(self, name: str = "router-engine") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the engine thread, under a copy of the caller's context."""
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Blocking variant for start-up and tests outside the event loop."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
