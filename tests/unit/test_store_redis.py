"""RedisStore beyond one node: building it from StoreConfig, Redis Cluster routing and broadcast, Sentinel failover.

The Store contract itself runs on every topology in tests/unit/test_store.py; these tests cover what only
a topology can get wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from support.redis_servers import SentinelSetup, start_cluster, start_redis, start_sentinel_setup

from gateway.config import SentinelConfig, StoreConfig
from gateway.errors import StoreError
from gateway.store import MemoryStore, open_store
from gateway.store.redis import RedisStore


def _prefix() -> str:
    return f"gwtest:{uuid4().hex[:8]}:"


def _sentinel(setup: SentinelSetup) -> SentinelConfig:
    return SentinelConfig(hosts=tuple(setup.hosts), master=setup.master)


# --- open_store ---


async def test_open_store_builds_each_topology() -> None:
    # Construction does no I/O, so nothing needs to listen on these ports.
    assert isinstance(open_store(StoreConfig()), MemoryStore)
    built = [
        open_store(StoreConfig(url="redis://127.0.0.1:1/0")),
        open_store(StoreConfig(url="redis://127.0.0.1:1", cluster=True)),
        open_store(StoreConfig(sentinel=SentinelConfig(hosts=("127.0.0.1:1",), master="m"))),
    ]
    try:
        assert all(isinstance(store, RedisStore) for store in built)
    finally:
        for store in built:
            await store.close()


async def test_sentinel_store_fails_fast_without_sentinels() -> None:
    store = RedisStore.for_sentinel(SentinelConfig(hosts=("127.0.0.1:1",), master="m"), "gwtest:", socket_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.get("k")
        assert time.monotonic() - started < 3.0
    finally:
        await store.close()


# --- cluster ---


@pytest.fixture
async def cluster_client(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster_url)
    try:
        yield client
    finally:
        await client.aclose()


def _tags_on_every_master(client: RedisCluster, prefix: str) -> dict[str, str]:
    """One hash tag per master: {node name: tag} such that lock:{tag} lives on that node."""
    found: dict[str, str] = {}
    for i in range(1000):
        tag = f"h{i}"
        node = client.get_node_from_key(f"{prefix}lock:{{{tag}}}")
        assert node is not None
        found.setdefault(node.name, tag)
        if len(found) == 3:
            return found
    raise AssertionError("no tag found for some master")


async def test_cluster_scripts_and_notify_work_on_every_master(
    redis_cluster_url: str, cluster_client: RedisCluster
) -> None:
    prefix = _prefix()
    await cluster_client.initialize()
    tags = _tags_on_every_master(cluster_client, prefix)
    writer, reader = (
        RedisStore.for_cluster(redis_cluster_url, prefix),
        RedisStore.for_cluster(redis_cluster_url, prefix),
    )
    try:
        await reader.start()
        for tag in tags.values():
            # Every script runs where its key lives (EVALSHA routed by key, NOSCRIPT → SCRIPT LOAD).
            assert await writer.acquire(f"lock:{{{tag}}}", "a", 5)
            assert await writer.renew(f"lock:{{{tag}}}", "a", 5)
            # The reader's subscriber sits on one node; PUBLISH from any master must reach it.
            async with reader.watch(f"lock:{{{tag}}}") as waiter:
                assert await writer.release(f"lock:{{{tag}}}", "a")
                assert await waiter.wait(2.0)
            async with reader.watch(f"result:{{{tag}}}") as waiter:
                await writer.set(f"result:{{{tag}}}", b"tokens", 5, notify=True)
                assert await waiter.wait(2.0)
            assert await reader.get(f"result:{{{tag}}}") == b"tokens"
    finally:
        await writer.close()
        await reader.close()


async def test_cluster_scripts_reload_after_script_flush(redis_cluster_url: str, cluster_client: RedisCluster) -> None:
    """Regression: a master that lost its script cache (restart, failover) must get the script loaded again."""
    prefix = _prefix()
    store = RedisStore.for_cluster(redis_cluster_url, prefix)
    try:
        assert await store.acquire("lock:{h}", "a", 5)
        assert await store.renew("lock:{h}", "a", 5)
        await cluster_client.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
        assert await store.renew("lock:{h}", "a", 5)
        assert await store.release("lock:{h}", "a")
    finally:
        await store.close()


async def test_cluster_subscriber_reconnects_after_connection_drop(redis_cluster_url: str) -> None:
    prefix = _prefix()
    store, writer = RedisStore.for_cluster(redis_cluster_url, prefix), RedisStore.for_cluster(redis_cluster_url, prefix)
    try:
        await store.start()
        # Kill every pub/sub connection in the (throwaway) cluster: ours among them.
        await writer.ping()
        admin = RedisCluster.from_url(redis_cluster_url)
        try:
            await admin.initialize()
            for node in admin.get_nodes():
                with redis.Redis(host=node.host, port=int(node.port)) as client:
                    client.client_kill_filter(_type="pubsub")
        finally:
            await admin.aclose()
        deadline = time.monotonic() + 5
        while True:
            async with store.watch("result:{h}") as waiter:
                await writer.set("result:{h}", b"tokens", 5, notify=True)
                if await waiter.wait(0.5):
                    break
            assert time.monotonic() < deadline, "subscriber did not come back"
    finally:
        await store.close()
        await writer.close()


# --- sentinel ---


async def test_sentinel_store_talks_to_the_master(redis_sentinel: SentinelSetup) -> None:
    prefix = _prefix()
    store = RedisStore.for_sentinel(_sentinel(redis_sentinel), prefix)
    try:
        await store.set("result:{h}", b"v", 5)
        async with aioredis.Redis(port=redis_sentinel.current_master_port()) as master:
            assert await master.get(f"{prefix}result:{{h}}") == b"v"
    finally:
        await store.close()


@pytest.mark.slow
async def test_sentinel_failover_fails_fast_then_recovers(tmp_path: Path) -> None:
    """Killing the master mid-flow: calls raise StoreError quickly, then work on the promoted replica."""
    with start_sentinel_setup(tmp_path) as setup:
        store = RedisStore.for_sentinel(_sentinel(setup), _prefix(), socket_timeout=1.0)
        try:
            await store.start()
            assert await store.acquire("lock:{h}", "owner", 30)
            with redis.Redis(port=setup.master_port) as master:
                # WAIT counts this connection's writes; replication is ordered, so the lock went first.
                master.set("gwtest:marker", b"1")
                assert master.wait(1, 2000) == 1  # the lock reached the replica before the crash
            async with store.watch("result:{h}") as early:
                # A waiter registered before the crash, as a request waiting on the lock holder would be.
                setup.kill_master()

                failures, slowest = 0, 0.0
                deadline = time.monotonic() + 20
                while True:
                    started = time.monotonic()
                    try:
                        holder = await store.get("lock:{h}")
                    except StoreError:
                        failures += 1
                    else:
                        if setup.current_master_port() == setup.replica_port:
                            break
                    finally:
                        slowest = max(slowest, time.monotonic() - started)
                    assert time.monotonic() < deadline, "no master after 20 s"
                    await asyncio.sleep(0.1)
                assert failures > 0  # the outage was observed, and each call within it failed fast
                assert slowest < 2.5
                assert holder == b"owner"  # the promoted replica has the lock
                assert await store.renew("lock:{h}", "owner", 30)

                # Announcements resume once the subscriber has found the new master.
                deadline = time.monotonic() + 10
                while not early.announced:
                    # Sentinels may still be settling (a read can see the new master before a
                    # write does): a failed write here is retried within the deadline.
                    with contextlib.suppress(StoreError):
                        await store.set("result:{h}", b"tokens", 5, notify=True)
                    await early.wait(0.5)
                    assert time.monotonic() < deadline, "announcements did not resume"
            async with store.watch("lock:{h}") as waiter:
                assert await store.release("lock:{h}", "owner")
                assert await waiter.wait(2.0)
        finally:
            await store.close()


@pytest.mark.slow
async def test_cluster_resharding_moves_a_session_without_losing_it(tmp_path: Path) -> None:
    """Issue 6: a Cluster resharding under a session's keys: lock, result and notifications keep working."""
    with start_cluster(tmp_path) as url:
        seed = int(url.rsplit(":", 1)[1])
        store, other = RedisStore.for_cluster(url, "gwtest:"), RedisStore.for_cluster(url, "gwtest:")
        try:
            assert await store.acquire("lock:{sess}", "owner-1", 30)
            await store.set("result:{sess}", b"sealed-successor", 60)
            with redis.Redis(port=seed) as client:
                slot = client.execute_command("CLUSTER KEYSLOT", "gwtest:result:{sess}")
            listing = subprocess.run(
                ["redis-cli", "-p", str(seed), "cluster", "nodes"], capture_output=True, text=True, check=True
            ).stdout
            nodes = [line.split() for line in listing.splitlines() if line.strip()]
            owner = next(n for n in nodes if any(_holds(r, slot) for r in n[8:]))
            target = next(n for n in nodes if n[0] != owner[0])
            count = sum(_size(r) for r in owner[8:])
            subprocess.run(
                ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{seed}", "--cluster-from", owner[0],
                 "--cluster-to", target[0], "--cluster-slots", str(count), "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
            )  # fmt: skip
            assert await store.get("result:{sess}") == b"sealed-successor"  # the key moved with its slot
            assert await store.renew("lock:{sess}", "owner-1", 30)
            async with other.watch("lock:{sess}") as waiter:
                assert await store.release("lock:{sess}", "owner-1")
                assert await waiter.wait(5)
            assert await other.acquire("lock:{sess}", "owner-2", 30)
        finally:
            await store.close()
            await other.close()


def _holds(spec: str, slot: int) -> bool:
    if spec.startswith("["):
        return False
    low, _, high = spec.partition("-")
    return int(low) <= slot <= int(high or low)


def _size(spec: str) -> int:
    if spec.startswith("["):
        return 0
    low, _, high = spec.partition("-")
    return int(high or low) - int(low) + 1


def _tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (cryptography, no openssl CLI)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    paths[2].write_bytes(key_pem)
    return paths


async def test_rediss_tls_store(tmp_path: Path) -> None:
    """`rediss://` talks TLS and verifies the server against the CA named in the URL (ssl_ca_certs)."""
    ca, cert, key = _tls_material(tmp_path)
    server = start_redis(
        lambda port: ["--port", "0", "--tls-port", str(port),
                      "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                      "--tls-auth-clients", "no"]
    )  # fmt: skip
    store = RedisStore(f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca}", "gwtest:")
    untrusted = RedisStore(f"rediss://127.0.0.1:{server.port}/0", "gwtest:")  # the system CAs do not know ours
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await store.ping()
                break
            except StoreError:
                assert time.monotonic() < deadline, "TLS redis-server did not come up"
                await asyncio.sleep(0.1)
        await store.set("result:{tls}", b"sealed", 10)
        assert await store.get("result:{tls}") == b"sealed"
        assert await store.acquire("lock:{tls}", "me", 5)
        async with store.watch("lock:{tls}") as waiter:
            assert await store.release("lock:{tls}", "me")
            assert await waiter.wait(5)
        with pytest.raises(StoreError):
            await untrusted.get("result:{tls}")
    finally:
        await store.close()
        await untrusted.close()
        server.stop()


async def test_a_write_to_a_connection_the_peer_reset_is_a_store_error(redis_url: str, key_prefix: str) -> None:
    """Regression (fault campaign): redis-py on uvloop raises RuntimeError for it; it must not become a 500."""
    store = RedisStore(redis_url, key_prefix)

    async def closed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    try:
        store._redis.get = closed  # type: ignore[method-assign]
        with pytest.raises(StoreError, match="connection closed"):
            await store.get("k")
    finally:
        await store.close()
