"""What is recorded about each request: its ID, and one JSON access log line.

``RequestInfo`` travels with the request (``scope["gateway"]``) and is filled in along the path;
the stage that answers writes the line. The path is logged without its query (queries carry
secrets) and the subject only as a short hash.

The line goes to the ``gateway.access`` logger. While that logger has only the stdout handler
``logs.configure`` gave it, lines skip the logging machinery (a record, a lock, a formatter and a
write per line: about half of the line's cost): they are gathered during one event-loop turn
and written to stdout together at its end, so a line is out before the loop waits for the next
event. Any other handler (an embedding app's, pytest's) gets every line through logging as usual.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from gateway.cache import BoundedCache
from gateway.sealing import Sealer

access_log = logging.getLogger("gateway.access")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestInfo:
    """What the access log line says about one request, filled in along the path."""

    __slots__ = ("request_id", "request_id_from_client", "reason", "upstream", "subject", "refreshed", "answered")

    def __init__(self) -> None:
        self.request_id = ""
        self.request_id_from_client = False
        self.reason: str | None = None
        self.upstream: float | None = None
        self.subject: Any = None
        self.refreshed = False
        self.answered: float | None = None  # WebSockets: perf_counter() when the handshake was answered

    def identify(self, client_value: bytes | None, new_id: RequestIds) -> None:
        """The client's X-Request-ID when it is sane (so traces join up), else a new one."""
        if client_value is not None and _REQUEST_ID.fullmatch(client_value):
            self.request_id, self.request_id_from_client = client_value.decode("ascii"), True
        else:
            self.request_id = new_id()


class RequestIds:
    """New request IDs: a random prefix per process and a counter (unique, and cheap to make)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFF:08x}"


class AccessLog:
    """One JSON line per request on the ``gateway.access`` logger (``server.access_log``)."""

    def __init__(self, enabled: bool, sealer: Sealer) -> None:
        self.enabled = enabled
        self._sealer = sealer
        self._subjects: BoundedCache[str, str] = BoundedCache()  # subject -> its short keyed hash

    def write(self, method: str, path: str, info: RequestInfo, route: str, status: int, elapsed: float) -> None:
        subject = info.subject
        if subject is not None:
            subject = str(subject)
            hashed = self._subjects.get(subject)
            if hashed is None:
                hashed = self._subjects.put(subject, self._sealer.token_hash(subject)[:16])
            subject = hashed
        record = {
            "time": _timestamp(),
            "request_id": info.request_id,
            "route": route,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "upstream_ms": round(info.upstream * 1000, 2) if info.upstream is not None else None,
            "outcome": info.reason or ("refreshed" if info.refreshed else "ok"),
            "subject": subject,
        }
        line = json.dumps(record, separators=(",", ":"))
        if _lines.direct():
            _lines.add(line)
        else:
            access_log.info(line)


_seconds: list[Any] = [0, ""]  # the last whole second seen, and its ISO form up to the seconds


def _timestamp() -> str:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")``, at a fraction of its cost."""
    now = time.time()
    second = int(now)
    if _seconds[0] != second:
        _seconds[0], _seconds[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_seconds[1]}.{int((now - second) * 1000):03d}+00:00"


class _Lines:
    """Access lines gathered during one event-loop turn, written at its end to the stream of the
    handler ``logs.configure`` gave the access logger (stdout)."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        atexit.register(self.flush)

    def direct(self) -> bool:
        """True while the access logger writes only through the handler ``logs.configure`` gave it."""
        handlers = access_log.handlers
        return len(handlers) == 1 and getattr(handlers[0], "gateway_stdout", False) and access_log.isEnabledFor(20)

    def add(self, line: str) -> None:
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: at once
                self.flush()

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            stream = getattr(access_log.handlers[0], "stream", sys.stdout) if access_log.handlers else sys.stdout
            try:
                stream.flush()  # whatever else was written to it goes out on its own
                for text in _chunks(lines):
                    stream.write(text)
                    stream.flush()
            except (OSError, ValueError):  # stdout closed or gone: as logging would, drop the lines
                pass


# POSIX: a write of at most PIPE_BUF bytes to a pipe is atomic (Linux: 4096; POSIX guarantees 512 at least,
# and every system the gateway runs on has 4096 or more). Workers share stdout: a longer write may be torn
# by another worker's, mid-line. Lines are ASCII (json.dumps escapes the rest): one character, one byte.
PIPE_BUF = 4096


def _chunks(lines: list[str]) -> Iterator[str]:
    """The lines, joined into line-aligned writes of at most ``PIPE_BUF`` bytes (a longer line alone)."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) + 1 > PIPE_BUF:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1
    if chunk:
        yield "\n".join(chunk) + "\n"


_lines = _Lines()
