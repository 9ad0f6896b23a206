"""The Redis implementation of ``Store``, shared by every worker process and host.

Locks are ``SET NX PX`` with an owner id; renew and release are compare-and-set Lua scripts so a
former owner whose lease expired can never extend or delete someone else's lock.  Announcements go
over one pub/sub channel (``{prefix}notify``, message = relative key) read by one background
subscriber per process, which wakes local waiters.

Three topologies, one class: a single server (``redis://``, ``rediss://``, ``unix://``); Sentinel,
where redis-py's ``SentinelConnectionPool`` asks the sentinels for the master on every new
connection, so after a failover the next connection goes to the promoted replica; and Cluster.
On a Cluster every script touches one key (keys of a session share a ``{h}`` hash tag), so
EVALSHA routes by that key, and SCRIPT LOAD goes to every primary.  Classic PUBLISH on a Cluster
is broadcast over the cluster bus to every node, so the subscriber is a plain connection to any
one node (a different one on each reconnect), not redis-py's ``ClusterPubSub``, which would pick
the node by the channel's slot and is built for sharded channels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import SentinelConfig
from gateway.errors import StoreError
from gateway.store import (
    POLL_INTERVAL,
    FamilyEnd,
    Finish,
    RecordKeys,
    TokenRecord,
    Waiter,
    Watchers,
    parse_attempt,
)

logger = logging.getLogger(__name__)

# SET and PUBLISH in one script, so a waiter that sees the announcement always finds the value.
_SET_NOTIFY = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# Idempotent for the holder, so a retry after a lost reply finds the lock its own.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], ARGV[3])
    return 1
end
return 0
"""

# Add to an expiring set (a sorted set scored by expiry), drop what has expired, keep the key
# as long as its longest member, and announce: one atomic step.
_ADD_MEMBER = """
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
    redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(last[2]) * 1000))
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# --- refresh records (docs/refresh.md): every state change of a refresh token is one script, on
# keys that share the family's hash tag. Times are Redis's own clock (TIME), in milliseconds, so
# workers on hosts with different clocks agree on deadlines and grace periods. Redis 7 replicates
# scripts by their effects, which is what lets a script that read TIME write afterwards.

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: ended, result, used, attempt, issued
_READ_RECORD = (
    _NOW
    + """
local used = redis.call('HMGET', KEYS[3], 'v', 'at')
return {now, redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]), used[1], used[2],
        redis.call('HGETALL', KEYS[4]), redis.call('GET', KEYS[5])}
"""
)

# KEYS: lock, attempt, ended, used   ARGV: owner, fence, window ms, ttl ms, fence to take over ('' none)
_BEGIN_ATTEMPT = (
    _NOW
    + """
local current = redis.call('HMGET', KEYS[2], 'fence', 'state', 'started')
-- The same call again (redis-py retries once after a reset): it happened, answer as the first time.
if current[1] == ARGV[2] and current[2] == 'pending' then return tonumber(current[3]) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return false end
if current[1] and current[2] ~= 'done' and current[1] ~= ARGV[5] then return false end
local retried = (ARGV[5] ~= '' and current[1]) and '1' or '0'
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'fence', ARGV[2], 'started', now, 'deadline', now + tonumber(ARGV[3]),
           'state', 'pending', 'retried', retried)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return now
"""
)

# KEYS: attempt   ARGV: fence, 'maybe' | 'clear'
# A retry took over an attempt whose answer was lost: that the retry never left does not mean the
# first one never did, so "clear" leaves it "maybe" (still retried: it is never sent a third time).
_SETTLE_ATTEMPT = """
local current = redis.call('HMGET', KEYS[1], 'fence', 'retried')
if current[1] ~= ARGV[1] then return 0 end
if ARGV[2] == 'clear' and current[2] ~= '1' then
    redis.call('DEL', KEYS[1])
else
    redis.call('HSET', KEYS[1], 'state', 'maybe')
end
return 1
"""

# KEYS: attempt, ended, used, members, then the write keys
# ARGV: fence, channel, announced key, used value ('' none), used ttl ms, member ('' none), member exp (epoch s),
#       then value and ttl ms for each write key
_FINISH = (
    _NOW
    + """
local current = redis.call('HMGET', KEYS[1], 'fence', 'state')
if current[1] ~= ARGV[1] then return 'superseded' end
if current[2] == 'done' then return 'ok' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'ended' end
for i = 5, #KEYS do
    redis.call('SET', KEYS[i], ARGV[8 + (i - 5) * 2], 'PX', ARGV[9 + (i - 5) * 2])
end
if ARGV[4] ~= '' then
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[3], 'v', ARGV[4], 'at', now)
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
if ARGV[6] ~= '' then
    redis.call('ZADD', KEYS[4], 'GT', ARGV[7], ARGV[6])
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now / 1000)
    local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
    if last[2] then redis.call('PEXPIREAT', KEYS[4], math.ceil(tonumber(last[2]) * 1000)) end
end
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 'ok'
"""
)

# KEYS: ended, members, head   ARGV: reason, ttl ms, now (epoch s)
_END_FAMILY = """
local first = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local reason = first and ARGV[1] or redis.call('GET', KEYS[1])
return {first and 1 or 0, reason, redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[3], '+inf', 'WITHSCORES'),
        redis.call('GET', KEYS[3])}
"""

_HEALTH_CHECK_INTERVAL = 15.0
_POLL_SECONDS = 1.0
_BACKOFF_MAX = 5.0


def _options(socket_timeout: float) -> dict[str, Any]:
    """Fail-fast connection options shared by every topology."""
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": _HEALTH_CHECK_INTERVAL,
        # The default retries several times with backoff; one immediate retry covers a stale pooled
        # connection after a Redis restart or failover without turning an outage into a hang.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }


def _with_address(url: str, host: str, port: int) -> str:
    """``url`` (credentials, TLS, options kept) pointed at another node."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{address}"))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@contextmanager
def _translated(op: str) -> Iterator[None]:
    """Turn redis and socket errors into StoreError; the message names the operation, never a value."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
        # Connection messages name host and port only; safe and useful in logs.
        raise StoreError(f"redis {op} failed: {type(exc).__name__}: {exc}") from None
    except RuntimeError as exc:
        # redis-py on uvloop: a write to a connection the peer just reset raises "unable to perform
        # operation on <TCPTransport closed=True>" (a RuntimeError); redis-py has disconnected it.
        raise StoreError(f"redis {op} failed: connection closed ({type(exc).__name__})") from None
    except (RedisError, RedisClusterException) as exc:
        # Other errors (ResponseError, "cluster cannot be connected"...) may echo arguments back, so
        # only the class is kept.  RedisClusterException is not a RedisError.
        raise StoreError(f"redis {op} failed: {type(exc).__name__}") from None


class RedisStore:
    """``Store`` on Redis: fails fast (short socket timeouts, one retry) so a request never hangs on it."""

    def __init__(self, url: str, key_prefix: str, *, socket_timeout: float = 2.0) -> None:
        client = aioredis.Redis.from_url(url, **_options(socket_timeout))
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
        sentinel_options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            # discover_master already moves on to the next sentinel when one fails.
            "retry": Retry(NoBackoff(), 0),
            "password": sentinel.sentinel_password,
            "ssl": tls,
        }
        manager = Sentinel(  # type: ignore[no-untyped-call]
            sentinel.addresses(), sentinel_kwargs=sentinel_options, password=sentinel.password, db=sentinel.db, ssl=tls
        )
        client = manager.master_for(sentinel.master, **_options(socket_timeout))
        store = cls.__new__(cls)
        store._init(client, key_prefix, socket_timeout, owns_client=True, also_close=list(manager.sentinels))
        return store

    @classmethod
    def for_cluster(cls, url: str, key_prefix: str, *, socket_timeout: float = 2.0) -> RedisStore:
        """A Redis Cluster found from the seed node in ``url``."""
        client = RedisCluster.from_url(url, **_options(socket_timeout))
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
        self._set_notify = client.register_script(_SET_NOTIFY)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._add_member = client.register_script(_ADD_MEMBER)
        self._acquire = client.register_script(_ACQUIRE)
        self._read_record = client.register_script(_READ_RECORD)
        self._begin_attempt = client.register_script(_BEGIN_ATTEMPT)
        self._settle_attempt = client.register_script(_SETTLE_ATTEMPT)
        self._finish = client.register_script(_FINISH)
        self._end_family = client.register_script(_END_FAMILY)
        # redis-py 8.1's asyncio RedisCluster races when many first commands initialize it at once
        # (connections are replaced under each other: AttributeError, ConnectionError), so the
        # first initialization is done once, behind a lock.
        self._cluster_init = asyncio.Lock() if isinstance(client, RedisCluster) else None
        self._watchers = Watchers()
        self._subscribed = asyncio.Event()
        self._subscriber: asyncio.Task[None] | None = None
        self._connecting_since = 0.0  # when the current subscription attempt began (monotonic)
        self._warned = False

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
        with _translated("get"):
            await self._ready()
            value = await self._redis.get(self._key(key))
        # The client is built without decode_responses, so anything but bytes or None is a bug.
        if value is not None and not isinstance(value, bytes):
            raise StoreError("redis get returned an unexpected type")
        return value

    async def set(self, key: str, value: bytes, ttl: float, *, notify: bool = False) -> None:
        with _translated("set"):
            await self._ready()
            if notify:
                await self._set_notify(keys=[self._key(key)], args=[value, _ms(ttl), self._channel, key])
            else:
                await self._redis.set(self._key(key), value, px=_ms(ttl))

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        with _translated("set_if_absent"):
            await self._ready()
            return bool(await self._redis.set(self._key(key), value, px=_ms(ttl), nx=True))

    async def delete(self, key: str) -> None:
        with _translated("delete"):
            await self._ready()
            await self._redis.delete(self._key(key))

    async def acquire(self, key: str, owner: str, lease: float) -> bool:
        with _translated("acquire"):
            await self._ready()
            return bool(await self._acquire(keys=[self._key(key)], args=[owner, _ms(lease)]))

    async def holder(self, key: str) -> str | None:
        value = await self.get(key)
        return value.decode(errors="replace") if value is not None else None

    async def renew(self, key: str, owner: str, lease: float) -> bool:
        with _translated("renew"):
            await self._ready()
            return bool(await self._renew(keys=[self._key(key)], args=[owner, _ms(lease)]))

    async def release(self, key: str, owner: str) -> bool:
        with _translated("release"):
            await self._ready()
            return bool(await self._release(keys=[self._key(key)], args=[owner, self._channel, key]))

    # --- refresh records (the scripts above) ---

    async def read_record(self, keys: RecordKeys) -> TokenRecord:
        names = [keys.ended, keys.result, keys.used, keys.attempt, keys.issued]
        with _translated("read_record"):
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
        with _translated("begin_attempt"):
            await self._ready()
            started = await self._begin_attempt(
                keys=[self._key(k) for k in names], args=[owner, fence, _ms(window), _ms(ttl), replace or ""]
            )
        return int(started) / 1000 if started else None

    async def settle_attempt(self, keys: RecordKeys, fence: str, state: Literal["maybe", "clear"]) -> bool:
        with _translated("settle_attempt"):
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
        with _translated("finish"):
            await self._ready()
            answer = await self._finish(keys=[self._key(k) for k in names], args=args)
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        if text not in ("ok", "ended", "superseded"):
            raise StoreError("redis finish returned an unexpected answer")
        return text  # type: ignore[return-value]

    async def end_family(self, keys: RecordKeys, reason: str, ttl: float, now: float) -> FamilyEnd:
        names = [keys.ended, keys.members, keys.head]
        with _translated("end_family"):
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
            await self._ensure_subscribed()
            yield waiter
        finally:
            self._watchers.remove(waiter)

    async def wait(self, key: str, timeout: float) -> bool:
        async with self.watch(key) as waiter:
            return await waiter.wait(timeout)

    async def add_member(self, key: str, member: str, expires_at: float) -> None:
        now = time.time()
        with _translated("add_member"):
            await self._ready()
            await self._add_member(keys=[self._key(key)], args=[member, expires_at, now, self._channel, key])

    async def members(self, key: str, now: float) -> dict[str, float]:
        with _translated("members"):
            await self._ready()
            found: list[tuple[Any, float]] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                self._key(key), f"({now}", "+inf", withscores=True
            )
        return {(m.decode() if isinstance(m, bytes) else str(m)): float(score) for m, score in found}

    async def ping(self) -> None:
        with _translated("ping"):
            await self._ready()
            await self._redis.ping()

    async def start(self) -> None:
        """Check Redis answers and start the subscriber now rather than on the first watch."""
        await self.ping()
        await self._ensure_subscribed()

    async def close(self) -> None:
        task, self._subscriber = self._subscriber, None
        if task is not None:
            task.cancel()
            # Bounded: closing its pub/sub connection must not hold up a worker's shutdown.
            await asyncio.wait([task], timeout=self._socket_timeout)
        if self._owns_client:
            await self._redis.aclose()
            for extra in self._also_close:
                await extra.aclose()

    async def _ensure_subscribed(self) -> None:
        """Start the subscriber if needed; while a subscription is being set up, wait for it briefly.

        Waiting matters: an announcement published before SUBSCRIBE took effect would be lost. But
        the wait is bounded by one poll interval per subscription attempt, not per waiter: while the
        subscription is down, waiters poll the store every ``POLL_INTERVAL`` instead (issue 12, 9).
        """
        if self._subscriber is None or self._subscriber.done():
            self._connecting_since = time.monotonic()
            self._subscriber = asyncio.create_task(self._subscribe_forever(), name="redisstore-subscriber")
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

    async def _subscribe_forever(self) -> None:
        """One pub/sub connection per process, reconnecting with backoff when it drops.

        Announcements published while it is down are lost; waiters poll the store meanwhile, so a
        drop costs latency (one poll interval), never correctness. A subscription the server never
        confirms (a connection that went silent) counts as down and is made again.
        """
        backoff = 0.1
        attempt = 0
        while True:
            client: aioredis.Redis | None = None
            pubsub: aioredis.client.PubSub | None = None
            self._connecting_since = time.monotonic()
            try:
                client = await self._subscriber_client(attempt)
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
                # RuntimeError: redis-py on uvloop, a write to a connection the peer reset (see _translated).
                logger.warning("store subscription lost (%s); retrying in %.1fs", type(exc).__name__, backoff)
            finally:
                # Until the next subscribe is confirmed, new watchers must not assume delivery.
                self._subscribed.clear()
                if pubsub is not None:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                if client is not None and client is not self._redis:
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            attempt += 1

    def _unconfirmed_for(self) -> float:
        return time.monotonic() - self._connecting_since

    async def _subscriber_client(self, attempt: int) -> aioredis.Redis:
        """The client to subscribe through: our own, or on a Cluster a connection to one node."""
        if isinstance(self._redis, aioredis.Redis):
            return self._redis
        # Any node will do (PUBLISH is broadcast cluster-wide); rotate so a dead node is left behind.
        await self._ready()
        nodes = self._redis.get_nodes()
        if not nodes or self._cluster_url is None:
            raise RedisConnectionError("no cluster node known")
        node = nodes[attempt % len(nodes)]
        return aioredis.Redis.from_url(
            _with_address(self._cluster_url, node.host, int(node.port)), **_options(self._socket_timeout)
        )

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] == "subscribe":
            # Confirmed by the server: from here on, every PUBLISH on the channel reaches us.
            self._subscribed.set()
            self._warned = False
        elif message["type"] == "message":
            data = message["data"]
            self._watchers.announce(data.decode() if isinstance(data, bytes) else str(data))
