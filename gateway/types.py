"""The vocabulary every stage shares: ASGI callables and the two shapes headers take.

ASGI carries headers as ``RawHeaders`` (lower-case names, bytes); the clients the gateway sends
with (aiohttp upstream, websockets) take ``StrHeaders``, latin-1 decoded so every byte survives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RawHeaders = list[tuple[bytes, bytes]]
StrHeaders = list[tuple[str, str]]
