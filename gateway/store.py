"""The shared store: a small bytes-in/bytes-out interface for locks, results and announcements.

Callers pass relative keys (``lock:{h}``, ``result:{h}``); the store prepends its key prefix.
Values are opaque bytes: sealing happens in the caller, so no store ever sees a token.

``MemoryStore`` serves one process; ``RedisStore`` (in ``gateway.redisstore``) is shared by
every worker and host, on one Redis server, behind Redis Sentinel, or on a Redis Cluster.  Both
announce keys to waiters registered with ``watch()``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from gateway.config import StoreConfig


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


class Store(Protocol):
    """What the refresher needs from shared state; every failure surfaces as ``StoreError``."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float, *, notify: bool = False) -> None:
        """Store ``value`` for ``ttl`` seconds; with ``notify``, atomically announce ``key`` to all waiters."""
        ...

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def acquire(self, key: str, owner: str, lease: float) -> bool:
        """Take the lock ``key`` for ``lease`` seconds unless someone holds it."""
        ...

    async def renew(self, key: str, owner: str, lease: float) -> bool:
        """Extend the lease, only if ``owner`` still holds the lock."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Delete the lock only if ``owner`` holds it, and then announce ``key``."""
        ...

    def watch(self, key: str) -> AbstractAsyncContextManager[Waiter]:
        """Register interest in ``key``: enter, check state, then ``await waiter.wait(timeout)``."""
        ...

    async def add_member(self, key: str, member: str, expires_at: float) -> None:
        """Add ``member`` to the expiring set ``key`` until ``expires_at`` (epoch seconds); announce ``key``."""
        ...

    async def members(self, key: str, now: float) -> dict[str, float]:
        """Members of the expiring set ``key`` still alive at ``now`` (epoch seconds), with their expiry."""
        ...

    async def wait(self, key: str, timeout: float) -> bool: ...

    async def ping(self) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """A one-process store: a dict with monotonic expiry; atomic because it never awaits mid-operation."""

    # Expired entries are dropped lazily on read and swept every so many writes, so memory stays bounded.
    _SWEEP_EVERY = 1000

    def __init__(self, key_prefix: str = "", *, clock: Callable[[], float] = time.monotonic) -> None:
        self._prefix = key_prefix
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}
        self._watchers = Watchers()
        self._writes = 0
        self._sets: dict[str, dict[str, float]] = {}

    def _live(self, key: str) -> bytes | None:
        entry = self._data.get(self._prefix + key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._data[self._prefix + key]
            return None
        return entry[0]

    def _put(self, key: str, value: bytes, ttl: float) -> None:
        self._data[self._prefix + key] = (value, self._clock() + ttl)
        self._writes += 1
        if self._writes % self._SWEEP_EVERY == 0:
            now = self._clock()
            for k in [k for k, (_, exp) in self._data.items() if exp <= now]:
                del self._data[k]

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float, *, notify: bool = False) -> None:
        self._put(key, value, ttl)
        if notify:
            self._watchers.announce(key)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, value, ttl)
        return True

    async def delete(self, key: str) -> None:
        self._data.pop(self._prefix + key, None)

    async def acquire(self, key: str, owner: str, lease: float) -> bool:
        return await self.set_if_absent(key, owner.encode(), lease)

    async def renew(self, key: str, owner: str, lease: float) -> bool:
        if self._live(key) != owner.encode():
            return False
        self._put(key, owner.encode(), lease)
        return True

    async def release(self, key: str, owner: str) -> bool:
        if self._live(key) != owner.encode():
            return False
        del self._data[self._prefix + key]
        self._watchers.announce(key)
        return True

    @asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[Waiter]:
        waiter = self._watchers.add(key)
        try:
            yield waiter
        finally:
            self._watchers.remove(waiter)

    async def wait(self, key: str, timeout: float) -> bool:
        async with self.watch(key) as waiter:
            return await waiter.wait(timeout)

    async def add_member(self, key: str, member: str, expires_at: float) -> None:
        # Expiry here is epoch time (it comes from token exp claims), not the store's monotonic clock.
        members = self._sets.setdefault(self._prefix + key, {})
        members[member] = max(expires_at, members.get(member, 0.0))
        now = time.time()
        for name in [m for m, exp in members.items() if exp <= now]:
            del members[name]
        self._watchers.announce(key)

    async def members(self, key: str, now: float) -> dict[str, float]:
        return {m: exp for m, exp in self._sets.get(self._prefix + key, {}).items() if exp > now}

    async def ping(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
        self._sets.clear()


def open_store(config: StoreConfig | str, key_prefix: str = "gw:") -> Store:
    """Build the store ``config`` describes: memory, one Redis (redis://, rediss://, unix://), Sentinel or Cluster.

    A bare URL (with ``key_prefix``) is accepted too, for tools and tests.
    """
    if isinstance(config, str):
        scheme = config.split("://", 1)[0].lower() if "://" in config else ""
        if scheme not in ("memory", "redis", "rediss", "unix"):
            raise ValueError(f"unsupported store URL scheme {scheme!r}: use memory://, redis://, rediss:// or unix://")
        config = StoreConfig(url=config, key_prefix=key_prefix)
    if config.sentinel is None and config.url.lower().startswith("memory:"):
        return MemoryStore(config.key_prefix)
    # Imported here so a memory-only deployment never needs a Redis connection set up.
    from gateway.redisstore import RedisStore

    if config.sentinel is not None:
        return RedisStore.for_sentinel(config.sentinel, config.key_prefix, tls=config.url.lower().startswith("rediss:"))
    if config.cluster:
        return RedisStore.for_cluster(config.url, config.key_prefix)
    return RedisStore(config.url, config.key_prefix)
