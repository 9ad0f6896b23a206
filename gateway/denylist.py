"""Revoked access tokens (by ``jti``), refused by every gateway process within a second.

The shared list is an expiring set in the store (each ``jti`` until its token's ``exp``). Each
process keeps a local copy, so checking a request costs a dict lookup, never a Redis round trip.
The copy is reloaded when the store announces a change (immediately) and at least once per
``poll`` seconds besides, so a dropped subscription delays a revocation by at most ``poll``.
If the store is unreachable the last copy is kept: revocations made before stay refused, and a
revocation whose write failed is written again by the sync loop once the store answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.config import MAX_LEEWAY
from gateway.errors import StoreError
from gateway.store import Store

log = logging.getLogger("gateway.denylist")

KEY = "denylist"
# How long an access token without an `exp` (an opaque one whose introspection or userinfo answer named none)
# stays refused after its session ends: longer than any IdP's access tokens live by default (Google and Okta 1 h,
# django-oauth-toolkit 10 h), so that a logged-out token never comes back (I3).
UNDATED_DENY = 86_400.0


def refuse_until(claims: dict[str, Any], now: float) -> float:
    """Until when a refused access token must stay refused: as long as verification may still accept it, its ``exp``
    plus ``MAX_LEEWAY`` (the most ``tokens.leeway`` can be, so that a reload raising the leeway cannot outlast the
    entry); ``UNDATED_DENY`` from now without an ``exp``. An entry that lapsed at ``exp`` would let a logged-out
    token pass again for the leeway (I3)."""
    exp = claims.get("exp")
    return float(exp) + MAX_LEEWAY if isinstance(exp, int | float) and not isinstance(exp, bool) else now + UNDATED_DENY


class Denylist:
    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        poll: float = 1.0,
        on_store_error: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._poll = poll
        self._local: dict[str, float] = {}
        self._unshared: dict[str, float] = {}  # denied here while the store was unreachable
        self._task: asyncio.Task[None] | None = None
        self._store_down = False
        self._closing = False
        self._on_store_error = on_store_error or (lambda: None)
        # Started while the store was unreachable: no revocation made before is known here, so tokens that could be
        # revoked are answered 503 (gateway.tokens.denial) until a load succeeds, never passed (I3).
        self.unknown = False

    def __contains__(self, jti: object) -> bool:
        if not isinstance(jti, str):
            return False
        exp = self._local.get(jti)
        return exp is not None and exp > self._clock()

    async def deny(self, jti: str, expires_at: float) -> None:
        """Refuse ``jti`` everywhere until ``expires_at``; locally at once even if the store is down."""
        self._local[jti] = max(expires_at, self._local.get(jti, 0.0))
        try:
            await self._store.add_member(KEY, jti, expires_at)
        except StoreError:
            self._unshared[jti] = self._local[jti]
            raise

    async def start(self) -> None:
        """Load the shared list, then keep it in sync: a process serves its first request knowing every revocation
        made before it started (the sync loop's first load waits for its subscription)."""
        if self._task is None:
            self.unknown = not await self._load()  # the store down: the loop loads as soon as it answers
            self._task = asyncio.create_task(self._sync_forever(), name="denylist-sync")

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: shutdown must not hang on a sync loop stuck in a store call.
            await asyncio.wait([task], timeout=2.0)

    async def _sync_forever(self) -> None:
        while not self._closing:
            try:
                # Watch first, then load: a change announced while loading still wakes the wait.
                async with self._store.watch(KEY) as waiter:
                    await self._load()
                    await waiter.wait(self._poll)
            except StoreError:
                await asyncio.sleep(self._poll)

    async def _load(self) -> bool:
        """Whether the shared list could be read (and this copy is up to date with it)."""
        try:
            remote = await self._store.members(KEY, self._clock())
        except StoreError as exc:
            self._on_store_error()
            if not self._store_down:
                log.warning("denylist: store unreachable, keeping %d local entries: %s", len(self._local), exc)
            self._store_down = True
            return False
        if self._store_down:
            log.info("denylist: store reachable again")
            self._store_down = False
        for jti, exp in list(self._unshared.items()):
            try:
                await self._store.add_member(KEY, jti, exp)
            except StoreError:
                break
            del self._unshared[jti]
        now = self._clock()
        # Keep local entries the store has not confirmed yet (a deny whose write failed).
        local = {j: e for j, e in self._local.items() if e > now}
        local.update(remote)
        self._local = local
        self.unknown = False
        return True
