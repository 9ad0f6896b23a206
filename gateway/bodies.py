"""Request bodies on their way upstream: streamed as they come, cut at the route's ``max_body``.

A declared ``Content-Length`` over the limit is refused before anything is forwarded
(``declared_too_large``); a chunked body is counted as it streams (``RequestBody``) and cut when
it passes the limit: the forwarder's upstream request fails, and the path answers 413 instead of
502 (or, when the upstream's answer is already on its way, the client's connection is cut).
"""

from __future__ import annotations

import sys

from gateway.errors import BodyTooLarge, ClientGone
from gateway.types import Receive


def declared_too_large(length: bytes | None, limit: int) -> bool:
    """A ``Content-Length`` over ``limit`` (one that is not a number never gets through uvicorn's parser)."""
    return length is not None and (not length.strip().isdigit() or int(length) > limit)


class RequestBody:
    """The client's body as the forwarder reads it, chunk by chunk, cut once it passes ``limit`` bytes.

    Past the limit it raises ``BodyTooLarge`` into the forwarder (whose upstream request then fails)
    and says so in ``too_large``: the failure is then answered 413, not 502.
    """

    __slots__ = ("_receive", "_left", "_more", "too_large")

    def __init__(self, receive: Receive, limit: int | None) -> None:
        self._receive = receive
        self._left = sys.maxsize if limit is None else limit
        self._more = True
        self.too_large = False

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        while self._more:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            self._more = message.get("more_body", False)
            chunk: bytes = message.get("body", b"")
            if chunk:
                self._left -= len(chunk)
                if self._left < 0:
                    self.too_large = True
                    raise BodyTooLarge()
                return chunk
        raise StopAsyncIteration
