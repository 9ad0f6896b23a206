"""The Redis implementation of ``Store``, shared by every worker process and host.

Locks are ``SET NX PX`` with an owner id; renew and release are compare-and-set Lua scripts so a
former owner whose lease expired can never extend or delete someone else's lock.  Announcements go
over one pub/sub channel (``{prefix}notify``, message = relative key) read by one background
subscriber per process, which wakes local waiters.

Three topologies, one class: a single server (``redis://``, ``rediss://``, ``unix://``); Sentinel,
where redis-py's ``SentinelConnectionPool`` asks the sentinels for the master on every new
connection, so after a failover the next connection goes to the promoted replica; and Cluster.
On a Cluster every script touches one slot (the keys of a family share its ``{root}`` hash tag),
so EVALSHA routes by its first key, and SCRIPT LOAD goes to every primary.  Classic PUBLISH on a Cluster
is broadcast over the cluster bus to every node, so the subscriber is a plain connection to any
one node (a different one on each reconnect), not redis-py's ``ClusterPubSub``, which would pick
the node by the channel's slot and is built for sharded channels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

import gateway.store.lua as lua
from gateway.config import SentinelConfig
from gateway.errors import StoreError
from gateway.store.base import FamilyEnd, Finish, RecordKeys, TokenRecord, parse_attempt
from gateway.store.connections import client_options, sentinel_master, translated, with_address
from gateway.store.subscriber import Subscriber
from gateway.store.waiters import Waiter, Watchers

logger = logging.getLogger(__name__)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """``Store`` on Redis: fails fast (short socket timeouts, one retry) so a request never hangs on it."""

    def __init__(self, url: str, key_prefix: str, *, socket_timeout: float = 2.0) -> None:
        client = aioredis.Redis.from_url(url, **client_options(socket_timeout))
        self._init(client, key_prefix, socket_timeout, owns_client=True)

    @classmethod
    def from_client(cls, client: aioredis.Redis, key_prefix: str, *, socket_timeout: float = 2.0) -> RedisStore:
        """Wrap an existing client; ``close()`` leaves it open for its owner."""
        store = cls.__new__(cls)
        store._init(client, key_prefix, socket_timeout, owns_client=False)
        return store

    @classmethod
    def for_sentinel(
        cls, sentinel: SentinelConfig, key_prefix: str, *, tls: bool = False, socket_timeout: float = 2.0
    ) -> RedisStore:
        """The master of ``sentinel.master``, re-discovered through the sentinels on every new connection."""
        client, sentinels = sentinel_master(sentinel, tls=tls, socket_timeout=socket_timeout)
        store = cls.__new__(cls)
        store._init(client, key_prefix, socket_timeout, owns_client=True, also_close=sentinels)
        return store

    @classmethod
    def for_cluster(cls, url: str, key_prefix: str, *, socket_timeout: float = 2.0) -> RedisStore:
        """A Redis Cluster found from the seed node in ``url``."""
        client = RedisCluster.from_url(url, **client_options(socket_timeout))
        store = cls.__new__(cls)
        store._init(client, key_prefix, socket_timeout, owns_client=True, cluster_url=url)
        return store

    def _init(
        self,
        client: aioredis.Redis | RedisCluster,
        key_prefix: str,
        socket_timeout: float,
        *,
        owns_client: bool,
        also_close: list[aioredis.Redis] | None = None,
        cluster_url: str | None = None,
    ) -> None:
        self._redis = client
        self._owns_client = owns_client
        self._also_close = also_close or []
        self._cluster_url = cluster_url
        self._prefix = key_prefix
        self._channel = f"{key_prefix}notify"
        self._socket_timeout = socket_timeout
        # AsyncScript runs EVALSHA and loads the script on NOSCRIPT (on a Cluster: on every primary).
        self._set_notify = client.register_script(lua.SET_NOTIFY)
        self._renew = client.register_script(lua.RENEW)
        self._release = client.register_script(lua.RELEASE)
        self._replace = client.register_script(lua.REPLACE)
        self._add_member = client.register_script(lua.ADD_MEMBER)
        self._acquire = client.register_script(lua.ACQUIRE)
        self._read_record = client.register_script(lua.READ_RECORD)
        self._begin_attempt = client.register_script(lua.BEGIN_ATTEMPT)
        self._settle_attempt = client.register_script(lua.SETTLE_ATTEMPT)
        self._finish = client.register_script(lua.FINISH)
        self._end_family = client.register_script(lua.END_FAMILY)
        # redis-py 8.1's asyncio RedisCluster races when many first commands initialize it at once
        # (connections are replaced under each other: AttributeError, ConnectionError), so the
        # first initialization is done once, behind a lock.
        self._cluster_init = asyncio.Lock() if isinstance(client, RedisCluster) else None
        self._watchers = Watchers()
        self._subscriber = Subscriber(self._channel, self._watchers, self._subscriber_client, socket_timeout)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def _ready(self) -> None:
        """On a Cluster, discover the nodes once before the first command (see ``_init``)."""
        if self._cluster_init is None:
            return
        async with self._cluster_init:
            if self._cluster_init is not None and isinstance(self._redis, RedisCluster):
                await self._redis.initialize()
                self._cluster_init = None

    async def get(self, key: str) -> bytes | None:
        with translated("get"):
            await self._ready()
            value = await self._redis.get(self._key(key))
        # The client is built without decode_responses, so anything but bytes or None is a bug.
        if value is not None and not isinstance(value, bytes):
            raise StoreError("redis get returned an unexpected type")
        return value

    async def set(self, key: str, value: bytes, ttl: float, *, notify: bool = False) -> None:
        with translated("set"):
            await self._ready()
            if notify:
                await self._set_notify(keys=[self._key(key)], args=[value, _ms(ttl), self._channel, key])
            else:
                await self._redis.set(self._key(key), value, px=_ms(ttl))

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        with translated("set_if_absent"):
            await self._ready()
            return bool(await self._redis.set(self._key(key), value, px=_ms(ttl), nx=True))

    async def delete(self, key: str) -> None:
        with translated("delete"):
            await self._ready()
            await self._redis.delete(self._key(key))

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        with translated("replace"):
            await self._ready()
            return bool(await self._replace(keys=[self._key(key)], args=[expected, value, _ms(ttl)]))

    async def acquire(self, key: str, owner: str, lease: float) -> bool:
        with translated("acquire"):
            await self._ready()
            return bool(await self._acquire(keys=[self._key(key)], args=[owner, _ms(lease)]))

    async def holder(self, key: str) -> str | None:
        value = await self.get(key)
        return value.decode(errors="replace") if value is not None else None

    async def renew(self, key: str, owner: str, lease: float) -> bool:
        with translated("renew"):
            await self._ready()
            return bool(await self._renew(keys=[self._key(key)], args=[owner, _ms(lease)]))

    async def release(self, key: str, owner: str) -> bool:
        with translated("release"):
            await self._ready()
            return bool(await self._release(keys=[self._key(key)], args=[owner, self._channel, key]))

    # --- refresh records (the scripts above) ---

    async def read_record(self, keys: RecordKeys) -> TokenRecord:
        names = [keys.ended, keys.result, keys.used, keys.attempt, keys.issued]
        with translated("read_record"):
            await self._ready()
            now, ended, result, used, rotated_at, attempt, issued = await self._read_record(
                keys=[self._key(k) for k in names]
            )
        pairs = dict(zip(attempt[::2], attempt[1::2], strict=True)) if attempt else None
        return TokenRecord(
            now=int(now) / 1000,
            ended=ended.decode(errors="replace") if ended else None,
            result=result or None,
            used=used or None,
            rotated_at=int(rotated_at) / 1000 if used and rotated_at else None,
            attempt=parse_attempt(pairs, scale=0.001),
            issued=issued or None,
        )

    async def begin_attempt(
        self, keys: RecordKeys, owner: str, fence: str, window: float, ttl: float, *, replace: str | None = None
    ) -> float | None:
        names = [keys.lock, keys.attempt, keys.ended, keys.used]
        with translated("begin_attempt"):
            await self._ready()
            started = await self._begin_attempt(
                keys=[self._key(k) for k in names], args=[owner, fence, _ms(window), _ms(ttl), replace or ""]
            )
        return int(started) / 1000 if started else None

    async def settle_attempt(self, keys: RecordKeys, fence: str, state: Literal["maybe", "clear"]) -> bool:
        with translated("settle_attempt"):
            await self._ready()
            return bool(await self._settle_attempt(keys=[self._key(keys.attempt)], args=[fence, state]))

    async def finish(
        self,
        keys: RecordKeys,
        fence: str,
        writes: Sequence[tuple[str, bytes, float]],
        *,
        used: tuple[bytes, float] | None = None,
        member: tuple[str, float] | None = None,
    ) -> Finish:
        names = [keys.attempt, keys.ended, keys.used, keys.members, *(key for key, _, _ in writes)]
        args: list[Any] = [fence, self._channel, keys.lock]
        args += [used[0], _ms(used[1])] if used is not None else ["", 0]
        args += [member[0], member[1]] if member is not None else ["", 0]
        for _, value, ttl in writes:
            args += [value, _ms(ttl)]
        with translated("finish"):
            await self._ready()
            answer = await self._finish(keys=[self._key(k) for k in names], args=args)
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        if text not in ("ok", "ended", "superseded"):
            raise StoreError("redis finish returned an unexpected answer")
        return text  # type: ignore[return-value]

    async def end_family(self, keys: RecordKeys, reason: str, ttl: float, now: float) -> FamilyEnd:
        names = [keys.ended, keys.members, keys.head]
        with translated("end_family"):
            await self._ready()
            first, found, members, head = await self._end_family(
                keys=[self._key(k) for k in names], args=[reason, _ms(ttl), now]
            )
        alive = {
            (m.decode() if isinstance(m, bytes) else str(m)): float(score)
            for m, score in zip(members[::2], members[1::2], strict=True)
        }
        text = found.decode(errors="replace") if isinstance(found, bytes) else reason
        return FamilyEnd(first=bool(first), reason=text, members=alive, head=head or None)

    @asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[Waiter]:
        waiter = self._watchers.add(key)
        try:
            await self._subscriber.ensure()
            yield waiter
        finally:
            self._watchers.remove(waiter)

    async def wait(self, key: str, timeout: float) -> bool:
        async with self.watch(key) as waiter:
            return await waiter.wait(timeout)

    async def add_member(self, key: str, member: str, expires_at: float) -> None:
        now = time.time()
        with translated("add_member"):
            await self._ready()
            await self._add_member(keys=[self._key(key)], args=[member, expires_at, now, self._channel, key])

    async def members(self, key: str, now: float) -> dict[str, float]:
        with translated("members"):
            await self._ready()
            found: list[tuple[Any, float]] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                self._key(key), f"({now}", "+inf", withscores=True
            )
        return {(m.decode() if isinstance(m, bytes) else str(m)): float(score) for m, score in found}

    async def ping(self) -> None:
        with translated("ping"):
            await self._ready()
            await self._redis.ping()

    async def start(self) -> None:
        """Check Redis answers and start the subscriber now rather than on the first watch."""
        await self.ping()
        await self._subscriber.ensure()

    async def close(self) -> None:
        await self._subscriber.close()
        if self._owns_client:
            await self._redis.aclose()
            for extra in self._also_close:
                await extra.aclose()

    async def _subscriber_client(self, attempt: int) -> tuple[aioredis.Redis, bool]:
        """The client to subscribe through: our own, or on a Cluster a new connection to one node (ours to close)."""
        if isinstance(self._redis, aioredis.Redis):
            return self._redis, False
        # Any node will do (PUBLISH is broadcast cluster-wide); rotate so a dead node is left behind.
        await self._ready()
        nodes = self._redis.get_nodes()
        if not nodes or self._cluster_url is None:
            raise RedisConnectionError("no cluster node known")
        node = nodes[attempt % len(nodes)]
        url = with_address(self._cluster_url, node.host, int(node.port))
        return aioredis.Redis.from_url(url, **client_options(self._socket_timeout)), True
