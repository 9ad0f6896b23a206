"""A raw asyncio HTTP/1.1 upstream for forwarder tests: it records each request's exact bytes and answers as a
test's handler says, misbehaving on purpose when asked (closing mid-body, never answering, 100 Continue...)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class RawRequest:
    """One request as the upstream read it: the head's bytes, parsed, and the body (de-chunked) and its raw bytes."""

    head: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_body: bytes = b""
    connection: int = 0  # which accepted connection carried it (0, 1, ...)

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name), None)


async def read_head(reader: asyncio.StreamReader, connection: int = 0) -> RawRequest:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("utf-8").split("\r\n")[:-2]
    method, target, _ = lines[0].split(" ", 2)
    headers = [(n, v.strip(" \t")) for n, _, v in (line.partition(":") for line in lines[1:])]
    return RawRequest(head, method, target, headers, connection=connection)


async def read_body(reader: asyncio.StreamReader, request: RawRequest) -> None:
    """The body as the head announces it: Content-Length or chunked (nothing otherwise)."""
    if (request.header("transfer-encoding") or "").lower() == "chunked":
        raw, body = b"", b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            data = await reader.readexactly(size + 2)
            raw += size_line + data
            body += data[:-2]
            if size == 0:  # the forwarders send no trailers
                break
        request.body, request.raw_body = body, raw
    elif (length := request.header("content-length")) is not None:
        request.body = request.raw_body = await reader.readexactly(int(length))


Handler = Callable[[RawRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def ok(request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Read the body, answer 200 ``ok``, keep the connection."""
    await read_body(reader, request)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


@dataclass
class RawUpstream:
    """``async with RawUpstream(handler) as url``: ``handler`` answers each request; False closes the connection."""

    handler: Handler = ok
    requests: list[RawRequest] = field(default_factory=list)
    connections: int = 0
    closed: int = 0  # connections the client (the forwarder) closed or reset
    server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                try:
                    request = await read_head(reader, number)
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed += 1
                    return
                self.requests.append(request)
                keep = await self.handler(request, reader, writer)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed += 1
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in self._writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()
