"""gateway.bodies and a route's max_body on the request path, in-process.

A declared Content-Length over the limit is refused before the forwarder is called; a streamed body is cut
as it passes the limit, and the forwarder's failure is then answered 413, not 502.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from support.fakes import Answer

from gateway.app import Gateway, create_app
from gateway.bodies import RequestBody, declared_too_large
from gateway.config import parse_config
from gateway.errors import BodyTooLarge, ClientGone, UpstreamFailure
from gateway.forwarder import UpstreamResponse

LIMIT = 1000
UPSTREAM = "http://127.0.0.1:9"  # never called: the forwarder is a fake


def receiver(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


async def read_all(body: RequestBody) -> list[bytes]:
    return [chunk async for chunk in body]


async def test_a_body_within_the_limit_streams_as_it_came() -> None:
    body = RequestBody(
        receiver(
            {"type": "http.request", "body": b"a" * 600, "more_body": True},
            {"type": "http.request", "body": b"b" * 400, "more_body": False},
        ),
        LIMIT,
    )
    assert await read_all(body) == [b"a" * 600, b"b" * 400] and not body.too_large


async def test_a_body_is_cut_as_it_passes_the_limit() -> None:
    body = RequestBody(
        receiver(
            {"type": "http.request", "body": b"a" * 600, "more_body": True},
            {"type": "http.request", "body": b"b" * 401, "more_body": True},
        ),
        LIMIT,
    )
    assert await anext(body) == b"a" * 600
    with pytest.raises(BodyTooLarge):
        await anext(body)
    assert body.too_large


async def test_no_limit_and_a_client_that_leaves() -> None:
    body = RequestBody(
        receiver({"type": "http.request", "body": b"a" * 5000, "more_body": True}, {"type": "http.disconnect"}), None
    )
    assert await anext(body) == b"a" * 5000
    with pytest.raises(ClientGone):
        await anext(body)


def test_declared_lengths() -> None:
    assert not declared_too_large(None, LIMIT) and not declared_too_large(b"1000", LIMIT)
    assert declared_too_large(b"1001", LIMIT) and declared_too_large(b"-1", LIMIT)


class ReadingUpstream:
    """A forwarder that reads the whole body first, failing as aiohttp does when the body iterator raises."""

    def __init__(self) -> None:
        self.calls = 0
        self.received = 0

    async def send(self, method: str, url: Any, headers: Any, body: Any, **_: float) -> UpstreamResponse:
        self.calls += 1
        try:
            async for chunk in body or ():
                self.received += len(chunk)
        except Exception:
            raise UpstreamFailure(timeout=False) from None
        return Answer()

    async def close(self) -> None:
        return None


@pytest.fixture
def upstream() -> ReadingUpstream:
    return ReadingUpstream()


@pytest.fixture
def gateway(upstream: ReadingUpstream) -> Gateway:
    config = parse_config(
        {
            "server": {"access_log": False},
            "tokens": {"algorithms": ["HS256"], "secret": "s" * 40},
            "routes": [
                {"name": "small", "path": "/small/", "upstream": UPSTREAM, "auth": "none", "max_body": LIMIT},
                {"name": "app", "path": "/", "upstream": UPSTREAM, "auth": "none"},
            ],
        },
        env={},
    )
    return create_app(config, forwarder=upstream)


async def post(app: Gateway, path: str, content: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.post(path, content=content)


async def test_a_declared_body_over_max_body_is_413_and_never_forwarded(
    gateway: Gateway, upstream: ReadingUpstream
) -> None:
    response = await post(gateway, "/small/up", b"x" * (LIMIT + 1))
    assert response.status_code == 413 and response.json()["reason"] == "body_too_large"
    assert response.headers["connection"] == "close"  # the rest of the body is not read
    assert upstream.calls == 0


async def test_a_streamed_body_over_max_body_is_cut_and_answered_413(
    gateway: Gateway, upstream: ReadingUpstream
) -> None:
    async def stream() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * 600

    response = await post(gateway, "/small/up", stream())
    assert response.status_code == 413 and response.json()["reason"] == "body_too_large"
    assert upstream.received <= LIMIT


async def test_max_body_is_per_route(gateway: Gateway, upstream: ReadingUpstream) -> None:
    assert (await post(gateway, "/small/up", b"x" * LIMIT)).status_code == 200
    assert (await post(gateway, "/elsewhere", b"x" * (LIMIT * 10))).status_code == 200
    assert upstream.received == LIMIT * 11
