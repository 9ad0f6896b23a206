"""Shared fixtures, one section per resource."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from uuid import uuid4

import pytest
import redis
from support.redis_servers import SentinelSetup, start_cluster, start_sentinel_setup
from support.servers import ServerProcess, start_upstream


def _free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- processes ---


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    """The demo echo upstream (`gateway.demo.upstream`) as a real process, one per test module."""
    with start_upstream() as server:
        yield server


# --- redis ---


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL if set, else a throwaway redis-server on a free loopback port for the session."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: install it (apt-get install redis-server) or set REDIS_URL", pytrace=False)
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(url, socket_timeout=0.5) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port}", pytrace=False)
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
