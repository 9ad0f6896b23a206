"""An in-process stand-in for the forwarder, for unit tests that drive the app over ASGITransport."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.forwarder import UpstreamResponse


class Answer:
    """A 200 with body ``ok``, read as the pipeline reads an upstream's body."""

    status = 200
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-length", b"2"),)

    def __init__(self) -> None:
        self.left = [b"ok"]

    async def read(self) -> bytes:
        return self.left.pop() if self.left else b""

    def at_eof(self) -> bool:
        return not self.left

    def close(self) -> None:
        return None


class RecordingUpstream:
    """A ``Forwarder`` that answers every request with ``Answer`` and records the headers it was given."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def send(self, method: str, url: Any, headers: Any, body: Any, **_: float) -> UpstreamResponse:
        self.seen.append(dict(headers))
        return Answer()

    async def close(self) -> None:
        return None
