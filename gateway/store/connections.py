"""How the Redis store connects: fail-fast client options, each topology's client, error translation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import SentinelConfig
from gateway.errors import StoreError

_HEALTH_CHECK_INTERVAL = 15.0


def client_options(socket_timeout: float) -> dict[str, Any]:
    """Fail-fast connection options shared by every topology."""
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": _HEALTH_CHECK_INTERVAL,
        # The default retries several times with backoff; one immediate retry covers a stale pooled
        # connection after a Redis restart or failover without turning an outage into a hang.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }


def with_address(url: str, host: str, port: int) -> str:
    """``url`` (credentials, TLS, options kept) pointed at another node."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{address}"))


def sentinel_master(
    sentinel: SentinelConfig, *, tls: bool, socket_timeout: float
) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """A client for the master of ``sentinel.master`` (re-discovered on every new connection), and the sentinels."""
    sentinel_options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        # discover_master already moves on to the next sentinel when one fails.
        "retry": Retry(NoBackoff(), 0),
        "password": sentinel.sentinel_password,
        "ssl": tls,
    }
    manager = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis-py 8
        sentinel.addresses(), sentinel_kwargs=sentinel_options, password=sentinel.password, db=sentinel.db, ssl=tls
    )
    return manager.master_for(sentinel.master, **client_options(socket_timeout)), list(manager.sentinels)


@contextmanager
def translated(op: str) -> Iterator[None]:
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
