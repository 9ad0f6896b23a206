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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.config import StoreConfig

# How often a waiter looks at the store again when no announcement came: a lost notification
# (a pub/sub connection that dropped) costs at most this much, never a lease (issue 12, point 6).
POLL_INTERVAL = 0.25


@dataclass(frozen=True, slots=True)
class RecordKeys:
    """The store keys of one refresh token ``h`` of the session family ``root``.

    Every key carries the family's hash tag ``{root}``, so the atomic scripts that move a token
    between states (docs/refresh.md) touch one Redis Cluster slot.
    """

    root: str
    h: str

    @property
    def lock(self) -> str:
        return f"lock:{{{self.root}}}:{self.h}"

    @property
    def attempt(self) -> str:
        return f"attempt:{{{self.root}}}:{self.h}"

    @property
    def result(self) -> str:
        return f"result:{{{self.root}}}:{self.h}"

    @property
    def used(self) -> str:
        return f"used:{{{self.root}}}:{self.h}"

    @property
    def issued(self) -> str:
        return f"issued:{{{self.root}}}:{self.h}"

    @property
    def ended(self) -> str:
        return f"ended:{{{self.root}}}"

    @property
    def members(self) -> str:
        return f"members:{{{self.root}}}"

    @property
    def head(self) -> str:
        return f"head:{{{self.root}}}"

    def of(self, h: str) -> RecordKeys:
        """The keys of another token of the same family."""
        return RecordKeys(self.root, h)


AttemptState = Literal["pending", "maybe", "done"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """A call to the IdP with this refresh token: begun by the owner holding ``fence``.

    Times are the store's clock (seconds). ``pending`` until the owner settles it: ``done`` (the
    successor is recorded), ``maybe`` (the IdP may have redeemed the token and the answer is
    lost), or deleted (the request never reached the IdP). A ``pending`` attempt past its
    ``deadline`` is one whose owner died or was cut off: it may have been sent.
    """

    fence: str
    started: float
    deadline: float
    state: AttemptState
    retried: bool


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One atomic read of everything the store knows about a refresh token (``now``: the store's clock)."""

    now: float
    ended: str | None = None  # the family's end: "logout", "reuse", "invalid_grant", "refresh_lost"
    result: bytes | None = None  # sealed: the successor (kept grace_period) or a shared failure
    used: bytes | None = None  # sealed: the successor of a superseded token
    rotated_at: float | None = None  # when it was superseded
    attempt: Attempt | None = None
    issued: bytes | None = None  # sealed: an access token the IdP issued with this token, not yet verified


Finish = Literal["ok", "ended", "superseded"]


@dataclass(frozen=True, slots=True)
class FamilyEnd:
    """What ending a family found: whether this call ended it, its access tokens, its newest refresh token."""

    first: bool
    reason: str
    members: dict[str, float]
    head: bytes | None


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

    # --- refresh records: each one atomic step (a Lua script on Redis); docs/refresh.md ---

    async def read_record(self, keys: RecordKeys) -> TokenRecord:
        """Family end, result, used, attempt and issued of one token, read at one instant."""
        ...

    async def begin_attempt(
        self, keys: RecordKeys, owner: str, fence: str, window: float, ttl: float, *, replace: str | None = None
    ) -> float | None:
        """Record a ``pending`` attempt under ``fence``; the store's time, or None if refused.

        Refused unless ``owner`` holds ``keys.lock``, the family is alive, the token is not
        superseded, and there is no unsettled attempt (other than ``replace``, which is taken over).
        Idempotent: repeated after a lost reply, it answers as the first time.
        """
        ...

    async def settle_attempt(self, keys: RecordKeys, fence: str, state: Literal["maybe", "clear"]) -> bool:
        """Mark the attempt ``maybe`` (answer lost) or delete it (never sent), only if it is still ``fence``'s.

        A retry (it took over a ``maybe`` attempt) is never deleted: it goes back to ``maybe``.
        """
        ...

    async def finish(
        self,
        keys: RecordKeys,
        fence: str,
        writes: Sequence[tuple[str, bytes, float]],
        *,
        used: tuple[bytes, float] | None = None,
        member: tuple[str, float] | None = None,
    ) -> Finish:
        """The owner's write-out, only if its attempt still holds ``fence`` and the family is alive.

        ``writes`` are (key, value, ttl) in the family's slot; ``used`` marks the token superseded
        (stamped with the store's time); ``member`` adds an access token (jti, exp) to the family.
        Announces ``keys.lock``. Idempotent: a repeat after a lost reply answers ``ok``.
        """
        ...

    async def end_family(self, keys: RecordKeys, reason: str, ttl: float, now: float) -> FamilyEnd:
        """Mark the family ended (the first reason stays) and return its live access tokens and head."""
        ...

    async def holder(self, key: str) -> str | None:
        """Who holds the lock ``key`` now (None: nobody)."""
        ...

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
        self._attempts: dict[str, tuple[dict[str, str], float]] = {}  # key -> (fields, expiry)
        self._used: dict[str, tuple[bytes, float, float]] = {}  # key -> (sealed successor, rotated at, expiry)

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
            for k in [k for k, (_, exp) in self._attempts.items() if exp <= now]:
                del self._attempts[k]
            for k in [k for k, (_, _, exp) in self._used.items() if exp <= now]:
                del self._used[k]

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
        # Idempotent for the holder: a retry after a lost reply finds the lock its own.
        if self._live(key) == owner.encode():
            self._put(key, owner.encode(), lease)
            return True
        return await self.set_if_absent(key, owner.encode(), lease)

    async def renew(self, key: str, owner: str, lease: float) -> bool:
        if self._live(key) != owner.encode():
            return False
        self._put(key, owner.encode(), lease)
        return True

    async def holder(self, key: str) -> str | None:
        value = self._live(key)
        return value.decode() if value is not None else None

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

    # --- refresh records (docs/refresh.md); atomic because none of them awaits ---

    def _attempt(self, key: str) -> dict[str, str] | None:
        entry = self._attempts.get(self._prefix + key)
        if entry is not None and entry[1] <= self._clock():
            del self._attempts[self._prefix + key]
            return None
        return entry[0] if entry is not None else None

    def _used_record(self, key: str) -> tuple[bytes, float] | None:
        entry = self._used.get(self._prefix + key)
        if entry is not None and entry[2] <= self._clock():
            del self._used[self._prefix + key]
            return None
        return entry[:2] if entry is not None else None

    async def read_record(self, keys: RecordKeys) -> TokenRecord:
        ended = self._live(keys.ended)
        used = self._used_record(keys.used)
        return TokenRecord(
            now=self._clock(),
            ended=ended.decode() if ended is not None else None,
            result=self._live(keys.result),
            used=used[0] if used is not None else None,
            rotated_at=used[1] if used is not None else None,
            attempt=parse_attempt(self._attempt(keys.attempt)),
            issued=self._live(keys.issued),
        )

    async def begin_attempt(
        self, keys: RecordKeys, owner: str, fence: str, window: float, ttl: float, *, replace: str | None = None
    ) -> float | None:
        current = self._attempt(keys.attempt)
        if current is not None and current["fence"] == fence and current["state"] == "pending":
            return float(current["started"])  # a repeat of this very call
        if self._live(keys.lock) != owner.encode():
            return None
        if self._live(keys.ended) is not None or self._used_record(keys.used) is not None:
            return None
        if current is not None and current["state"] != "done" and current["fence"] != (replace or ""):
            return None
        now = self._clock()
        retried = "1" if replace and current is not None else "0"
        fields = {"fence": fence, "started": str(now), "deadline": str(now + window), "state": "pending"}
        self._attempts[self._prefix + keys.attempt] = (fields | {"retried": retried}, now + ttl)
        return now

    async def settle_attempt(self, keys: RecordKeys, fence: str, state: Literal["maybe", "clear"]) -> bool:
        current = self._attempt(keys.attempt)
        if current is None or current["fence"] != fence:
            return False
        if state == "clear" and current["retried"] != "1":
            del self._attempts[self._prefix + keys.attempt]
        else:  # a retry that never left does not clear the lost first attempt it took over
            current["state"] = "maybe"
        return True

    async def finish(
        self,
        keys: RecordKeys,
        fence: str,
        writes: Sequence[tuple[str, bytes, float]],
        *,
        used: tuple[bytes, float] | None = None,
        member: tuple[str, float] | None = None,
    ) -> Finish:
        current = self._attempt(keys.attempt)
        if current is None or current["fence"] != fence:
            return "superseded"
        if current["state"] == "done":
            return "ok"
        if self._live(keys.ended) is not None:
            return "ended"
        for key, value, ttl in writes:
            self._put(key, value, ttl)
        now = self._clock()
        if used is not None:
            self._used[self._prefix + keys.used] = (used[0], now, now + used[1])
        if member is not None:
            await self.add_member(keys.members, *member)
        current["state"] = "done"
        self._watchers.announce(keys.lock)
        return "ok"

    async def end_family(self, keys: RecordKeys, reason: str, ttl: float, now: float) -> FamilyEnd:
        existing = self._live(keys.ended)
        if existing is None:
            self._put(keys.ended, reason.encode(), ttl)
        return FamilyEnd(
            first=existing is None,
            reason=existing.decode() if existing is not None else reason,
            members=await self.members(keys.members, now),
            head=self._live(keys.head),
        )

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
        self._attempts.clear()
        self._used.clear()


def parse_attempt(fields: dict[str, str] | dict[bytes, bytes] | None, *, scale: float = 1.0) -> Attempt | None:
    """An attempt record from its stored fields (str from memory, bytes and milliseconds from Redis)."""
    if not fields:
        return None
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    state = text.get("state")
    if state not in ("pending", "maybe", "done"):
        return None
    return Attempt(
        fence=text.get("fence", ""),
        started=float(text.get("started", 0)) * scale,
        deadline=float(text.get("deadline", 0)) * scale,
        state=state,  # type: ignore[arg-type]
        retried=text.get("retried") == "1",
    )


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
