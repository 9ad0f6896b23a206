"""Throwaway Redis topologies for tests: a 3-master Cluster and a Sentinel setup, on free loopback ports.

Nothing is persisted (--save '' --appendonly no); every process is stopped on exit.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from support.servers import free_port as _free_port


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: install it (apt-get install redis-server)", pytrace=False)
    return binary


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _redis_server(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [_redis_binary(), *args, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _pings(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=0.5) as client:
        return bool(client.ping())


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = _free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextmanager
def start_cluster(workdir: Path) -> Iterator[str]:
    """A throwaway 3-master Redis Cluster (no replicas); yields a seed-node URL once cluster_state is ok."""
    ports = [_cluster_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            procs.append(
                _redis_server(
                    "--port", str(port), "--cluster-enabled", "yes",
                    "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", "2000",
                    cwd=workdir,
                )
            )  # fmt: skip
        for port in ports:
            _wait_for(lambda port=port: _pings(port), f"cluster node on port {port}")  # type: ignore[misc]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )

        def ready() -> bool:
            for port in ports:
                with redis.Redis(port=port, socket_timeout=0.5) as client:
                    if client.cluster("info").get("cluster_state") != "ok":
                        return False
            return True

        _wait_for(ready, "cluster_state:ok")
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        _stop(procs)


@dataclass
class SentinelSetup:
    """A master, one replica and one sentinel (quorum 1) watching them as ``master``."""

    master: str
    sentinel_port: int
    master_port: int
    replica_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{self.sentinel_port}"]

    def current_master_port(self) -> int:
        with redis.Redis(port=self.sentinel_port, socket_timeout=0.5) as client:
            host, port = client.sentinel_get_master_addr_by_name(self.master)
            return int(port)

    def kill_master(self) -> None:
        """SIGKILL the process that is master right now."""
        port = self.current_master_port()
        proc = self.procs["master" if port == self.master_port else "replica"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@contextmanager
def start_sentinel_setup(workdir: Path) -> Iterator[SentinelSetup]:
    """Start the Sentinel topology; returns once the sentinel knows the master and its replica."""
    setup = SentinelSetup(
        master="gwmaster", sentinel_port=_free_port(), master_port=_free_port(), replica_port=_free_port()
    )
    try:
        # No diskless-sync delay (default 5 s): the replica is in sync as soon as it attaches.
        setup.procs["master"] = _redis_server(
            "--port", str(setup.master_port), "--repl-diskless-sync-delay", "0", cwd=workdir
        )
        setup.procs["replica"] = _redis_server(
            "--port", str(setup.replica_port), "--replicaof", "127.0.0.1", str(setup.master_port), cwd=workdir
        )
        for port in (setup.master_port, setup.replica_port):
            _wait_for(lambda port=port: _pings(port), f"redis-server on port {port}")  # type: ignore[misc]

        def replicated() -> bool:
            with redis.Redis(port=setup.replica_port, socket_timeout=0.5) as client:
                return bool(client.info("replication").get("master_link_status") == "up")

        _wait_for(replicated, "the replica to attach")
        conf = workdir / f"sentinel-{setup.sentinel_port}.conf"
        conf.write_text(
            f"port {setup.sentinel_port}\nbind 127.0.0.1\n"
            f"sentinel monitor {setup.master} 127.0.0.1 {setup.master_port} 1\n"
            f"sentinel down-after-milliseconds {setup.master} 1000\n"
            f"sentinel failover-timeout {setup.master} 5000\n"
            f"sentinel parallel-syncs {setup.master} 1\n"
        )
        setup.procs["sentinel"] = subprocess.Popen(
            [_redis_binary(), str(conf), "--sentinel"],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def watching() -> bool:
            with redis.Redis(port=setup.sentinel_port, socket_timeout=0.5) as client:
                return len(client.sentinel_slaves(setup.master)) == 1

        _wait_for(watching, "the sentinel to find the replica")
        yield setup
    finally:
        _stop(list(setup.procs.values()))
