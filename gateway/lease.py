"""``Lease``: the refresh lock, kept while its owner works with the IdP.

A lock with a fixed time to live fails exactly when it matters: a slow IdP outlives it (oauth2-proxy
PR #3456). The lease is renewed in the background instead, and losing it is survivable: the
attempt's fence in the store, not the lock, decides whose write-out counts (docs/refresh.md).
"""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import StoreError
from gateway.store import Store

log = logging.getLogger("gateway.refresh")


class Lease:
    """Keeps the refresh lock while the owner works (oauth2-proxy PR #3456: a slow IdP outlives a fixed TTL).

    Renews every quarter lease, gives each renewal an eighth of the lease, and retries a failed or
    stalled one at once, so a slow reply cannot push the next renewal past the lease. When the key
    has expired anyway it is taken back if nobody else holds it; when another owner holds it,
    ``lost`` says so. Losing the lock is not fatal: the attempt's fence, not the lock, decides
    whose write-out counts.
    """

    def __init__(self, store: Store, key: str, owner: str, lease: float) -> None:
        self._store, self._key, self.owner, self._lease = store, key, owner, lease
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.lost = False
        self.kept = False  # a background task took over stopping and releasing

    def start(self) -> Lease:
        self._task = asyncio.create_task(self._run(), name="refresh-lease")
        return self

    async def release(self) -> None:
        # A flag as well as a cancellation: on Python 3.11, asyncio.wait_for inside redis-py can
        # swallow a cancellation that lands as its reply does, and the renewals would go on for
        # ever (found by the fault campaign: a request hung on it). Never wait for it unbounded.
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self._lease)
        try:
            await self._store.release(self._key, self.owner)
        except StoreError as exc:
            log.warning("refresh lock %s not released (%s); it expires by itself", self._key[:24], exc)

    async def _run(self) -> None:
        failing = False
        while not self._stopped:
            await asyncio.sleep(self._lease / 4)
            if self._stopped:
                return
            while not await self._renew_once():
                if self.lost or self._stopped:
                    return
                if not failing:
                    log.warning("refresh lock %s: renewal failed; retrying at once", self._key[:24])
                failing = True
                await asyncio.sleep(0.02)
            failing = False

    async def _renew_once(self) -> bool:
        try:
            async with asyncio.timeout(self._lease / 8):
                if await self._store.renew(self._key, self.owner, self._lease):
                    return True
                holder = await self._store.holder(self._key)
                if holder is None and await self._store.acquire(self._key, self.owner, self._lease):
                    log.warning("refresh lock %s had expired; taken back", self._key[:24])
                    return True
        except (StoreError, TimeoutError):
            return False
        self.lost = True
        log.warning("refresh lock %s is held by another owner now; the attempt's fence still guards the write-out",
                    self._key[:24])  # fmt: skip
        return False
