"""uvicorn serving an ASGI app with the gateway's client hop (``gateway.client_ws.ClientHop``) on 127.0.0.1, in
process, with the frame allowance ``limits.websocket_options`` gives it for a message limit."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from gateway.client_ws import ClientHop
from gateway.limits import frame_allowance


@contextlib.asynccontextmanager
async def serving(app: Any, limit: int) -> AsyncIterator[str]:
    """``async with serving(app, limit) as url``: the ``ws://`` URL it answers on, until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, ws=ClientHop, ws_max_size=frame_allowance(limit), lifespan="off", log_level="error")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        await task
