"""Which worker of a ``gateway serve --workers N`` served a request, read from /proc, not guessed.

Requests on fresh connections *probably* spread over the workers; a test about every worker must
show it. ``WorkerClients`` holds keep-alive connections until each worker has accepted one of them
(the server end of a connection is a socket in exactly one worker process), sends a batch over
them, and tells for every response which worker held its connection right after it answered.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import httpx

from support.ports import children, connection_owner, listening_inodes, socket_inodes
from support.servers import GatewayProcess

Request = tuple[str, str, dict[str, str]]  # method, URL, headers
KEEP_ALIVE = 3.0  # seconds a pinned connection may idle before it is made again (uvicorn closes it at 5)


def worker_pids(gateway: GatewayProcess, count: int | None = None, timeout: float = 30.0) -> list[int]:
    """The gateway's workers: the processes serving its listening socket (its children with ``--workers N``,
    else the process itself). With ``count``, waits until there are that many."""
    assert gateway.process is not None
    deadline = time.monotonic() + timeout
    while True:
        listening = listening_inodes(gateway.port)
        found = [pid for pid in children(gateway.process.pid) if listening & socket_inodes(pid)]
        if not found and listening & socket_inodes(gateway.process.pid):
            found = [gateway.process.pid]
        if count is None or len(found) == count:
            return sorted(found)
        assert time.monotonic() < deadline, f"{len(found)} workers, not {count}: {gateway.log()[-2000:]}"
        time.sleep(0.05)


def client_port(response: httpx.Response) -> int:
    """The local port of the connection ``response`` came on."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


@dataclass
class Served:
    worker: int | None  # the pid of the worker holding the connection once answered (None: closed by then)
    response: httpx.Response


class WorkerClients:
    """One keep-alive connection held by each worker of ``gateway`` (``workers`` of them), to send batches
    that every worker provably serves a part of."""

    def __init__(self, gateway: GatewayProcess, workers: int | None = None, *, timeout: float = 10.0) -> None:
        self.gateway, self.count, self.timeout = gateway, workers or gateway.workers, timeout
        self.pids: list[int] = []
        self._clients: dict[int, tuple[httpx.Client, float]] = {}  # worker pid -> (client, last used)

    def __enter__(self) -> Self:
        self.pids = worker_pids(self.gateway, self.count)
        self._pin()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for client, _ in self._clients.values():
            client.close()
        self._clients.clear()

    def owner(self, response: httpx.Response) -> int | None:
        return connection_owner(self.gateway.port, client_port(response), self.pids)

    def _pin(self) -> None:
        """Open connections until each worker holds one; others are closed again."""
        now = time.monotonic()
        for pid, (client, used) in list(self._clients.items()):
            if now - used > KEEP_ALIVE:  # the worker may be about to close it: make another
                client.close()
                del self._clients[pid]
        deadline = now + 30
        while missing := set(self.pids) - set(self._clients):
            assert time.monotonic() < deadline, f"no connection reached workers {sorted(missing)}"
            client = httpx.Client(timeout=self.timeout, limits=httpx.Limits(max_connections=1))
            owner = self.owner(client.get(f"{self.gateway.url}/.gateway/health"))
            if owner in missing:
                self._clients[owner] = (client, time.monotonic())
            else:
                client.close()

    def batch(self, requests: list[Request]) -> list[Served]:
        """Send ``requests``, the i-th over worker i mod N's connection (the workers' shares concurrently);
        the answers in order, each with the worker that held its connection when it came."""
        self._pin()
        served: list[Served | None] = [None] * len(requests)

        def share(index: int, pid: int) -> None:
            client, _ = self._clients[pid]
            moved = False
            for i in range(index, len(requests), len(self.pids)):
                method, url, headers = requests[i]
                response = client.request(method, url, headers=headers)
                served[i] = Served(self.owner(response), response)
                moved = moved or served[i].worker != pid  # the worker closed it; the new one is anybody's
            self._clients[pid] = (client, float("-inf") if moved else time.monotonic())  # moved: pin again

        with ThreadPoolExecutor(len(self.pids)) as pool:
            for done in [pool.submit(share, n, pid) for n, pid in enumerate(self.pids)]:
                done.result()  # a share's exception is the batch's
        return [s for s in served if s is not None]

    def statuses(self, requests: list[Request]) -> dict[int | None, set[int]]:
        """The statuses each worker answered ``requests`` with (key None: a connection closed before it could
        be told)."""
        found: dict[int | None, set[int]] = {}
        for s in self.batch(requests):
            found.setdefault(s.worker, set()).add(s.response.status_code)
        return found
