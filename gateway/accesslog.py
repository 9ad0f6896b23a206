"""What is recorded about each request: its ID, and one JSON access log line.

``RequestInfo`` travels with the request (``scope["gateway"]``) and is filled in along the path;
the stage that answers writes the line. The path is logged without its query (queries carry
secrets) and the subject only as a short hash.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from datetime import UTC, datetime
from typing import Any

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

    def write(self, method: str, path: str, info: RequestInfo, route: str, status: int, elapsed: float) -> None:
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": info.request_id,
            "route": route,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "upstream_ms": round(info.upstream * 1000, 2) if info.upstream is not None else None,
            "outcome": info.reason or ("refreshed" if info.refreshed else "ok"),
            "subject": self._sealer.token_hash(str(info.subject))[:16] if info.subject is not None else None,
        }
        access_log.info(json.dumps(record, separators=(",", ":")))
