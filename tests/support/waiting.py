"""Waiting for something observable to happen, with a deadline, instead of sleeping a guessed while."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``condition()`` until it is truthy and return it; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(interval)
    return value


async def until(
    condition: Callable[[], T | Awaitable[T]], what: str, timeout: float = 10.0, interval: float = 0.01
) -> T:
    """``wait_until`` in a running event loop (the loop runs meanwhile); ``condition`` may be async."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(interval)


async def announcements_arrive(store: Any, timeout: float = 10.0) -> None:
    """Until an announcement reaches a watcher of ``store`` (a gateway ``Store``): its subscription is up.

    A store subscribes on first use and waits for that only briefly (waiters poll meanwhile, by
    design), so an announcement made before the subscription took effect is lost. Tests about
    announcements start once they flow."""
    deadline = time.monotonic() + timeout
    while True:
        async with store.watch("probe:{announcements}") as waiter:
            await store.set("probe:{announcements}", b"", 5, notify=True)
            if await waiter.wait(0.5):
                return
        assert time.monotonic() < deadline, f"no announcement reached a watcher within {timeout} s"
