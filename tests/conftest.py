"""Shared fixtures, one section per resource.

Layout: tests/unit/ mirrors the package module by module (tests/unit/test_routing.py tests
gateway/routing.py, tests/unit/demo/ tests gateway/demo/), plus checks that need no gateway
process (deployment files, the fault proxy); some use a real redis-server. tests/integration/
starts real `gateway serve` (or `gateway demo`) processes, and Chromium. tests/support/ holds the
servers and helpers both use, imported as `support` (this directory is on sys.path: pytest's
default "prepend" import mode puts it there for this conftest; bench/ adds it itself). Test
modules are not packages, so their file names must be unique across the tree.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from uuid import uuid4

import pytest
import redis
import uvloop
from support.ports import refused_port
from support.redis_servers import SentinelSetup, start_cluster, start_redis, start_sentinel_setup
from support.servers import ServerProcess, start_upstream

# --- ports ---


# The forwarding transport's own tests run on both event loops: the gateway serves on uvloop, whose
# transports raise what asyncio's do not (a write to a connection the upstream closed, for one).
BOTH_LOOPS = ("test_upstream_h1", "test_upstream_h1_review", "test_forwarder_differential")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    module = getattr(item, "module", None)
    if module is not None and module.__name__.rpartition(".")[2] in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}  # every other test: the default loop, test names unchanged


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (bound, never listening; nobody else gets it)."""
    with refused_port() as port:
        yield port


# --- processes ---


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    """The demo echo upstream (`gateway.demo.upstream`) as a real process, one per test module."""
    with start_upstream() as server:
        yield server


# --- redis ---


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL if set, else a throwaway redis-server on a loopback port of its own for the session."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not found: install it (apt-get install redis-server) or set REDIS_URL", pytrace=False)
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A prefix unique to the test; only keys under it are deleted afterwards (never FLUSHDB)."""
    prefix = f"gwtest:{uuid4().hex[:8]}:"
    yield prefix
    # Synchronous on purpose: usable from sync and async tests alike, and from getfixturevalue.
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)


# --- redis cluster and sentinel ---
#
# Real topologies (tests/support/redis_servers.py), started once per session; the failover tests
# start their own Sentinel setup, since they kill its master.


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A seed-node URL of a throwaway 3-master Redis Cluster."""
    with start_cluster(tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """A Sentinel setup shared by the session; tests must not kill its master."""
    with start_sentinel_setup(tmp_path_factory.mktemp("redis-sentinel")) as setup:
        yield setup
