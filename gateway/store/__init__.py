"""The shared store: a small bytes-in/bytes-out interface for locks, results and announcements.

``MemoryStore`` (``memory``) serves one process; ``RedisStore`` (``redis``) is shared by every
worker and host, on one Redis server, behind Redis Sentinel, or on a Redis Cluster. Both announce
keys to waiters registered with ``watch()`` (``waiters``). The protocol and the refresh records
are in ``base``; the Redis side's atomic scripts in ``lua``, its pub/sub reader in ``subscriber``.
"""

from __future__ import annotations

from gateway.config import StoreConfig
from gateway.store.base import (
    BACKGROUND_RETRY,
    POLL_INTERVAL,
    RETRY_PAUSE,
    Attempt,
    AttemptState,
    FamilyEnd,
    Finish,
    RecordKeys,
    Store,
    TokenRecord,
    parse_attempt,
)
from gateway.store.memory import MemoryStore
from gateway.store.waiters import Waiter, Watchers

__all__ = [
    "BACKGROUND_RETRY",
    "POLL_INTERVAL",
    "RETRY_PAUSE",
    "Attempt",
    "AttemptState",
    "FamilyEnd",
    "Finish",
    "MemoryStore",
    "RecordKeys",
    "Store",
    "TokenRecord",
    "Waiter",
    "Watchers",
    "open_store",
    "parse_attempt",
]


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
    from gateway.store.redis import RedisStore

    if config.sentinel is not None:
        return RedisStore.for_sentinel(config.sentinel, config.key_prefix, tls=config.url.lower().startswith("rediss:"))
    if config.cluster:
        return RedisStore.for_cluster(config.url, config.key_prefix)
    return RedisStore(config.url, config.key_prefix)
