"""Request bodies through a real `gateway serve` to an upstream that answers before it reads them (issue 17).

nginx's ``return``, webhooks and some legacy apps answer as soon as they have the head and read the body after.
The gateway lets the body finish and keeps the upstream connection for the next request, as aiohttp's client
does; it used to abort it (one new upstream connection per POST). The upstream is support.recorder's raw
server with ``answer_first``: it counts the connections it accepted and the body bytes of every request.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from support.recorder import Recorder
from support.servers import GatewayProcess, start_gateway

BODY = b"x" * 65536


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    with Recorder(answer_first=True) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(recorder: Recorder) -> Iterator[GatewayProcess]:
    config = {
        "server": {"access_log": False},
        "tokens": {"algorithms": ["HS256"], "secret": "bodies-integration-secret-0123456789abcdef"},
        "routes": [{"name": "app", "path": "/", "upstream": recorder.url, "auth": "none"}],
    }
    with start_gateway(config, workers=1) as server:
        yield server


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_posts_answered_before_their_body_arrive_whole_over_one_kept_connection(
    gateway: GatewayProcess, recorder: Recorder, framing: str
) -> None:
    before, seen = recorder.connections, len(recorder.seen)

    def body() -> Iterator[bytes]:  # httpx sends an iterator chunked, without a length
        yield BODY[:1000]
        yield BODY[1000:]

    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for number in range(5):
            content = BODY if framing == "content-length" else body()
            answer = client.post(f"/upload/{number}", content=content)
            assert (answer.status_code, answer.text) == (200, "ok")
    uploads = recorder.seen[seen:]
    assert [(s.path, s.body_bytes, s.complete) for s in uploads] == [
        (f"/upload/{n}", len(BODY), True) for n in range(5)
    ]
    assert recorder.connections - before <= 1  # one kept connection (a new one at most for the first request)
