"""Loopback ports for servers under test, without handing a just-freed port to another process.

Binding port 0, closing the socket and passing the number on is a race: anything on the machine
(other test sessions run at the same time) may take the port in between, and the test then talks
to somebody else's server, or its server fails to start. Instead:

* a server in this process binds port 0 itself and reports the port it got;
* a subprocess that has to be told its port (its URL is in its own config, or in another
  process's) is started on a candidate port and watched (``launch``): it is up once *it* holds a
  socket listening on that port (read from /proc, so a stranger answering on the port does not
  count), and when it exits because the address was taken, it is started again on another;
* a port that must refuse connections is held bound, never listening, for as long as it is
  needed (``refused_port``): nobody else can take it meanwhile.

The /proc readers also tell which process holds a connection: ``connection_owner`` is how tests
prove that several workers of one ``gateway serve`` served a batch.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

LISTEN, ESTABLISHED = "0A", "01"
ADDRESS_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


def free_port() -> int:
    """A loopback port that was free a moment ago: a *candidate* for ``launch`` (which retries when it is
    taken by then), never a promise."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port where connections are refused for as long as the block lasts: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# --- /proc ------------------------------------------------------------------------------------------


def _tcp_sockets() -> Iterator[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every TCP socket (IPv4 and IPv6) of this network namespace."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            yield int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` has open (none once it is gone)."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listening_inodes(port: int) -> set[int]:
    return {inode for local, _, state, inode in _tcp_sockets() if local == port and state == LISTEN}


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port``."""
    return bool(listening_inodes(port) & socket_inodes(pid))


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def connection_owner(server_port: int, client_port: int, pids: Iterable[int]) -> int | None:
    """Which of ``pids`` holds the server end of the open connection from ``client_port`` to ``server_port``."""
    inodes = {
        inode
        for local, remote, state, inode in _tcp_sockets()
        if local == server_port and remote == client_port and state == ESTABLISHED
    }
    for pid in pids:
        if inodes & socket_inodes(pid):
            return pid
    return None


# --- starting servers -------------------------------------------------------------------------------


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate, kill after 5 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def launch(
    start: Callable[[int], subprocess.Popen[bytes]],
    output: Callable[[], str],
    *,
    what: str,
    port: int | None = None,
    candidates: Callable[[], int] = free_port,
    also: Callable[[int], Iterable[int]] = lambda port: (),
    taken: re.Pattern[str] = ADDRESS_IN_USE,
    attempts: int = 10,
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[bytes], int]:
    """``start(port)`` on a candidate port until the process listens there itself; the process and its port.

    A process that exits saying the address is in use (``taken``, searched in ``output()``, its log so
    far) was beaten to the port: it is started again on the next candidate. ``port`` pins the port (no
    retry); ``also`` names further ports the process must listen on (a Redis Cluster node's bus port).
    """
    for _ in range(1 if port is not None else attempts):
        candidate = port if port is not None else candidates()
        process = start(candidate)
        deadline = time.monotonic() + timeout
        while not all(listens(process.pid, p) for p in (candidate, *also(candidate))):
            if process.poll() is not None:
                break
            if time.monotonic() > deadline:
                stop(process)
                raise TimeoutError(f"{what} did not listen on port {candidate} within {timeout} s:\n{output()}")
            time.sleep(0.02)
        else:
            return process, candidate
        text = output()
        if port is not None or not taken.search(text):
            raise RuntimeError(f"{what} exited with {process.returncode} before listening on {candidate}:\n{text}")
    raise RuntimeError(f"{what}: the port was taken on each of {attempts} attempts")
