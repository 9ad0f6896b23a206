"""A WebSocket upstream on the ``websockets`` library (permessage-deflate offered), in a thread of the test process,
and the messages the size tests send through the gateway.

On ``send <kind> <variant> <size> <seed>`` it sends ``payload(kind, variant, size, seed)``; any other message is
answered with its digest (``{"kind", "size", "sha256"}``), so that a message the client sent is checked whole
without being sent back.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from types import TracebackType
from typing import Self

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

Message = str | bytes

# Characters of 1, 2 and 3 bytes in UTF-8: random text of them barely compresses, and counts bytes, not characters.
_ALPHABET = [chr(c) for c in (*range(0x21, 0x7F), *range(0xA1, 0x800, 7), *range(0x800, 0xD7FF, 97))]


def payload(kind: str, variant: str, size: int, seed: int = 0) -> Message:
    """``size`` bytes (UTF-8 bytes for text): ``random`` ones that deflate cannot shrink (binary) or barely
    (text), or ``repeated`` ones that deflate to almost nothing. Text is mostly multi-byte characters."""
    rng = random.Random(seed)
    if kind == "binary":
        return rng.randbytes(size) if variant == "random" else b"gateway " * (size // 8) + b"g" * (size % 8)
    if variant == "repeated":
        return "é" * (size // 2) + "a" * (size % 2)
    chars, used = [], 0
    while used < size - 3:
        char = rng.choice(_ALPHABET)
        chars.append(char)
        used += len(char.encode())
    return "".join(chars) + "a" * (size - used)


def digest(message: Message) -> dict[str, object]:
    data = message.encode() if isinstance(message, str) else message
    kind = "text" if isinstance(message, str) else "binary"
    return {"kind": kind, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _handler(connection: ServerConnection) -> None:
    try:
        for message in connection:
            if isinstance(message, str) and message.startswith("send "):
                kind, variant, size, seed = message.split()[1:]
                connection.send(payload(kind, variant, int(size), int(seed)))
            else:
                connection.send(json.dumps(digest(message)))
    except ConnectionClosed:
        pass


class DeflatingUpstream:
    """The upstream as a context manager; ``url`` is its http:// base (the gateway's routes take http URLs)."""

    def __init__(self) -> None:
        self._server: Server = serve(_handler, "127.0.0.1", 0, compression="deflate", max_size=None)
        self.url = f"http://127.0.0.1:{self._server.socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="deflating-upstream", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)
