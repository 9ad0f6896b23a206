"""Throwaway redis-servers for tests: a plain one, a 3-master Cluster and a Sentinel setup, on loopback.

redis-server cannot bind port 0 and report it, so each is started on a candidate port and counts
as up once it listens there itself; if the port was taken meanwhile it exits ("Address already
in use") and is started again on another (support.ports.launch). Nothing is persisted
(--save '' --appendonly no); every process is stopped on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from support.ports import free_port, launch, stop


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
        stop(proc)


class RedisServer:
    """A redis-server process on a port of its own; its output goes to a log file."""

    def __init__(
        self,
        args: Callable[[int], list[str]],
        *,
        cwd: Path | None = None,
        port: int | None = None,
        candidates: Callable[[], int] = free_port,
        also: Callable[[int], Iterable[int]] = lambda port: (),
    ) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="redis-", suffix=".log", delete=False)

        def spawn(candidate: int) -> subprocess.Popen[bytes]:
            self._log.seek(0)
            self._log.truncate()
            return subprocess.Popen(
                [_redis_binary(), *args(candidate)], cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
            )

        try:
            self.process, self.port = launch(
                spawn, self.log, what="redis-server", port=port, candidates=candidates, also=also
            )
        except BaseException:
            self._close_log()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        stop(self.process)
        self._close_log()

    def _close_log(self) -> None:
        if not self._log.closed:
            self._log.close()
            os.unlink(self._log.name)


def _plain(*args: str) -> list[str]:
    return [*args, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]


def start_redis(args: Callable[[int], list[str]] | None = None, *, cwd: Path | None = None) -> RedisServer:
    """A plain redis-server: ``args(port)`` (default ``--port PORT``) plus no persistence, on 127.0.0.1 only;
    answering PING once this returns."""
    server = RedisServer(lambda port: _plain(*(args(port) if args else ["--port", str(port)])), cwd=cwd)
    try:
        if args is None:  # a TLS-only server (--port 0 --tls-port PORT) is the caller's to ping
            _wait_for(lambda: _pings(server.port), f"redis-server on port {server.port}")
    except BaseException:
        server.stop()
        raise
    return server


def _pings(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=0.5) as client:
        return bool(client.ping())


def _cluster_port() -> int:
    """A candidate port whose cluster bus port (port + 10000) is valid and free too, a moment ago."""
    while True:
        port = free_port()
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
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            nodes.append(
                RedisServer(
                    lambda port: _plain(
                        "--port", str(port), "--cluster-enabled", "yes",
                        "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                        "--cluster-node-timeout", "2000",
                    ),
                    cwd=workdir,
                    candidates=_cluster_port,
                    also=lambda port: [port + 10000],  # the cluster bus
                )
            )  # fmt: skip
        ports = [node.port for node in nodes]
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
        _stop([node.process for node in nodes])
        for node in nodes:
            node.stop()


@dataclass
class SentinelSetup:
    """A master, one replica and one sentinel (quorum 1) watching them as ``master``."""

    master: str
    sentinel_port: int = 0
    master_port: int = 0
    replica_port: int = 0
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
    setup = SentinelSetup(master="gwmaster")
    servers: list[RedisServer] = []

    def started(name: str, server: RedisServer) -> int:
        servers.append(server)
        setup.procs[name] = server.process
        return server.port

    try:
        # No diskless-sync delay (default 5 s): the replica is in sync as soon as it attaches.
        setup.master_port = started(
            "master",
            RedisServer(lambda port: _plain("--port", str(port), "--repl-diskless-sync-delay", "0"), cwd=workdir),
        )
        setup.replica_port = started(
            "replica",
            RedisServer(
                lambda port: _plain("--port", str(port), "--replicaof", "127.0.0.1", str(setup.master_port)),
                cwd=workdir,
            ),
        )
        for port in (setup.master_port, setup.replica_port):
            _wait_for(lambda port=port: _pings(port), f"redis-server on port {port}")  # type: ignore[misc]

        def replicated() -> bool:
            with redis.Redis(port=setup.replica_port, socket_timeout=0.5) as client:
                return bool(client.info("replication").get("master_link_status") == "up")

        _wait_for(replicated, "the replica to attach")

        def sentinel(port: int) -> list[str]:
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {setup.master} 127.0.0.1 {setup.master_port} 1\n"
                f"sentinel down-after-milliseconds {setup.master} 1000\n"
                f"sentinel failover-timeout {setup.master} 5000\n"
                f"sentinel parallel-syncs {setup.master} 1\n"
            )
            return [str(conf), "--sentinel"]

        setup.sentinel_port = started("sentinel", RedisServer(sentinel, cwd=workdir))

        def watching() -> bool:
            with redis.Redis(port=setup.sentinel_port, socket_timeout=0.5) as client:
                return len(client.sentinel_slaves(setup.master)) == 1

        _wait_for(watching, "the sentinel to find the replica")
        yield setup
    finally:
        _stop(list(setup.procs.values()))
        for server in servers:
            server.stop()
