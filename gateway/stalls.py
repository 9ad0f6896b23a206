"""Noticing when this process stood still: SIGSTOP, a paused VM or container, a long GC.

A request that sat in a stalled worker reads the store late. Carrying a refresh token that was
rotated meanwhile, it would look like a thief's replay past the grace period and end the
session (issue 12: "a worker paused at any point"). A ticker notices each stall of the event
loop; a refresh flight is credited with the stalls that ended shortly before it began or during
it, and judged as if it had arrived that much earlier.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

TICK = 0.1  # how often the ticker runs; a gap well above it is a stall
STALL = 0.5  # a gap longer than this counts
LOOKBACK = 1.0  # a stall that ended this long before a flight began may have held its request


class Stalls:
    """Records the event loop's stalls (when each ended, how long it lasted), on monotonic time."""

    def __init__(self) -> None:
        self._stalls: deque[tuple[float, float]] = deque(maxlen=64)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the ticker in the running loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tick(), name="stall-ticker")

    def credit(self, since: float) -> float:
        """Seconds of stalls that ended after ``since - LOOKBACK`` (monotonic)."""
        return sum(length for ended, length in self._stalls if ended >= since - LOOKBACK)

    def note(self, ended: float, length: float) -> None:
        self._stalls.append((ended, length))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=1.0)

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            if now - last > STALL:
                self.note(now, now - last - TICK)
            last = now
