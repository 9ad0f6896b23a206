"""``MemoryStore``: the store of a single process (tests, demos, one worker without Redis)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Literal

from gateway.store.base import FamilyEnd, Finish, RecordKeys, TokenRecord, parse_attempt
from gateway.store.waiters import Waiter, Watchers


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

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        if self._live(key) != expected:
            return False
        self._put(key, value, ttl)
        return True

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
        if current is not None and current["fence"] == fence:  # a repeat of this very call, or one settled since
            return float(current["started"]) if current["state"] == "pending" else None
        if self._live(keys.lock) != owner.encode():
            return None
        if self._live(keys.ended) is not None or self._used_record(keys.used) is not None:
            return None
        unsettled = current is not None and current["state"] not in ("done", "cleared")
        if unsettled and current is not None and current["fence"] != (replace or ""):
            return None
        now = self._clock()
        retried = "1" if replace and unsettled else "0"
        fields = {"fence": fence, "started": str(now), "deadline": str(now + window), "state": "pending"}
        self._attempts[self._prefix + keys.attempt] = (fields | {"retried": retried}, now + ttl)
        return now

    async def settle_attempt(self, keys: RecordKeys, fence: str, state: Literal["maybe", "clear"]) -> bool:
        current = self._attempt(keys.attempt)
        if current is not None and current["fence"] != fence:
            return False
        if current is not None and current["state"] == "cleared":
            return True
        if state == "clear" and (current is None or current.get("retried") != "1"):
            # As lua.SETTLE_ATTEMPT: the fence stays behind, cleared (a late begin_attempt is refused).
            self._attempts[self._prefix + keys.attempt] = ({"fence": fence, "state": "cleared"}, self._clock() + 120)
        elif current is not None:  # a retry that never left does not clear the lost first attempt it took over
            current["state"] = "maybe"
        else:
            return False
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
        if current is not None and current["fence"] != fence:
            return "superseded"
        if current is not None and current["state"] == "done":
            return "ok"
        prior = self._used_record(keys.used) if current is None else None
        if prior is not None:  # as lua.FINISH: another owner's successor, unless it is this very write-out's
            return "ok" if used is not None and prior[0] == used[0] else "superseded"
        if self._live(keys.ended) is not None:
            return "ended"
        for key, value, ttl in writes:
            self._put(key, value, ttl)
        now = self._clock()
        if used is not None:
            self._used[self._prefix + keys.used] = (used[0], now, now + used[1])
        if member is not None:
            await self.add_member(keys.members, *member)
        if current is not None:
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
