"""Sliding-window meters on an injected clock: how busy the router was, how fast requests leave the queue."""

from __future__ import annotations

from collections import deque
from typing import Callable


class WindowSum:
    """Sum of amounts recorded in the last `window` seconds."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        self.window = window
        self.clock = clock
        self.started = clock()
        self._items: deque[tuple[float, float]] = deque()  # (time, amount)
        self._sum = 0.0
        self.total = 0.0  # since start

    def add(self, amount: float) -> None:
        self._items.append((self.clock(), amount))
        self._sum += amount
        self.total += amount

    def sum(self) -> float:
        horizon = self.clock() - self.window
        while self._items and self._items[0][0] < horizon:
            self._sum -= self._items.popleft()[1]
        return max(0.0, self._sum)

    def span(self) -> float:
        """Seconds the window covers so far (shorter than `window` just after start)."""
        return max(1e-9, min(self.window, self.clock() - self.started))

    def rate(self) -> float:
        """Amount per second over the window."""
        return self.sum() / self.span()


class BusyMeter(WindowSum):
    """Fraction of wall time the router spent computing steps: record each step's compute seconds as it ends."""

    def fraction(self) -> float:
        return min(1.0, self.rate())
