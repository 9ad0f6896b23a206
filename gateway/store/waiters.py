"""Local waiters on store keys: registered before the caller checks state, so no announcement is lost."""

from __future__ import annotations

import asyncio


class Waiter:
    """Interest in one key, registered before the caller checks state so no announcement is lost."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._event = asyncio.Event()

    def announce(self) -> None:
        self._event.set()

    @property
    def announced(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float) -> bool:
        """Return True once the key was announced (even before this call), False after ``timeout``."""
        if self._event.is_set():
            return True
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the event being set, and a cancelled waiter must stop.
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class Watchers:
    """Local registry of waiters by key; both stores dispatch announcements through it."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[Waiter]] = {}

    def add(self, key: str) -> Waiter:
        waiter = Waiter(key)
        self._by_key.setdefault(key, set()).add(waiter)
        return waiter

    def remove(self, waiter: Waiter) -> None:
        waiters = self._by_key.get(waiter.key)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._by_key[waiter.key]

    def announce(self, key: str) -> None:
        for waiter in self._by_key.get(key, ()):
            waiter.announce()

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_key.values())
