"""The Redis store's one pub/sub reader per process: announcements on the channel wake local waiters.

Announcements published while it is down are lost; waiters poll the store meanwhile
(``POLL_INTERVAL``), so a drop costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.base import POLL_INTERVAL
from gateway.store.waiters import Watchers

logger = logging.getLogger("gateway.store.redis")

_POLL_SECONDS = 1.0
_BACKOFF_MAX = 5.0

# attempt number -> (client to subscribe through, whether we close it afterwards)
Connect = Callable[[int], Awaitable[tuple[aioredis.Redis, bool]]]


class Subscriber:
    """Subscribes to ``channel`` in the background and announces each message's key to ``watchers``."""

    def __init__(self, channel: str, watchers: Watchers, connect: Connect, socket_timeout: float) -> None:
        self._channel = channel
        self._watchers = watchers
        self._connect = connect
        self._socket_timeout = socket_timeout
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connecting_since = 0.0  # when the current subscription attempt began (monotonic)
        self._warned = False

    async def ensure(self) -> None:
        """Start the subscriber if needed; while a subscription is being set up, wait for it briefly.

        Waiting matters: an announcement published before SUBSCRIBE took effect would be lost. But
        the wait is bounded by one poll interval per subscription attempt, not per waiter: while the
        subscription is down, waiters poll the store every ``POLL_INTERVAL`` instead (issue 12, 9).
        """
        if self._task is None or self._task.done():
            self._connecting_since = time.monotonic()
            self._task = asyncio.create_task(self._run(), name="redisstore-subscriber")
        if self._subscribed.is_set():
            return
        left = self._connecting_since + POLL_INTERVAL - time.monotonic()
        if left > 0:
            try:
                async with asyncio.timeout(left):
                    await self._subscribed.wait()
            except TimeoutError:
                pass
        if not self._subscribed.is_set() and not self._warned:
            self._warned = True
            logger.warning("store notifications unavailable; waiters poll every %.2fs", POLL_INTERVAL)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: closing its pub/sub connection must not hold up a worker's shutdown.
            await asyncio.wait([task], timeout=self._socket_timeout)

    async def _run(self) -> None:
        """One pub/sub connection, reconnecting with backoff when it drops.

        A subscription the server never confirms (a connection that went silent) counts as down and
        is made again.
        """
        backoff = 0.1
        attempt = 0
        while True:
            client: aioredis.Redis | None = None
            owned = False
            pubsub: aioredis.client.PubSub | None = None
            self._connecting_since = time.monotonic()
            try:
                client, owned = await self._connect(attempt)
                pubsub = client.pubsub()
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=_POLL_SECONDS)
                    if message is not None:
                        self._dispatch(message)
                        backoff = 0.1
                    elif (
                        not self._subscribed.is_set()
                        and time.monotonic() - self._connecting_since > self._socket_timeout
                    ):
                        raise RedisTimeoutError("subscription not confirmed")
            except (RedisError, RedisClusterException, OSError, RuntimeError) as exc:
                # RuntimeError: redis-py on uvloop, a write to a connection the peer reset (see connections.translated).
                logger.warning("store subscription lost (%s); retrying in %.1fs", type(exc).__name__, backoff)
            finally:
                # Until the next subscribe is confirmed, new watchers must not assume delivery.
                self._subscribed.clear()
                if pubsub is not None:
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis-py 8
                if client is not None and owned:
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            attempt += 1

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] == "subscribe":
            # Confirmed by the server: from here on, every PUBLISH on the channel reaches us.
            self._subscribed.set()
            self._warned = False
        elif message["type"] == "message":
            data = message["data"]
            self._watchers.announce(data.decode() if isinstance(data, bytes) else str(data))
