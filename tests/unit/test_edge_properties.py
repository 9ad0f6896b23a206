"""Generated requests against the edge (issue 14, proof): what the upstream receives is what was authorised.

For any path, the request the upstream receives, read the way common upstreams read paths
(servlet containers drop ``;params``, IIS folds case and trims trailing dots and spaces, many
servers fold case, nginx merges slashes), belongs to the very route the gateway authorised; and
no identity or proxy header a client sends survives, however it is spelled.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fakes import Answer

from gateway.app import Gateway, create_app
from gateway.config import parse_config
from gateway.forwarder import UpstreamResponse
from gateway.routing import RouteTable

SECRET = "edge-properties-secret-0123456789abcdef"
CONFIG = {
    "server": {"access_log": False},
    "tokens": {"algorithms": ["HS256"], "secret": SECRET},
    "identity": {"headers": {"X-Auth-User": "sub", "X-Auth-Roles": "roles"}},
    "routes": [
        {"name": "admin", "path": "/admin/", "upstream": "http://admin.up", "require": {"claims": {"is_staff": True}}},
        {"name": "api", "path": "/api/", "upstream": "http://api.up"},
        {"name": "public", "path": "/public/", "upstream": "http://public.up", "auth": "none"},
        {"name": "app", "path": "/", "upstream": "http://app.up", "auth": "optional"},
    ],
}
TABLE = RouteTable.from_config(parse_config(CONFIG).routes)
# How upstreams read a path, written here independently of the gateway's own READINGS.
NORMALISERS = {
    "servlet": lambda path: "/".join(s.split(";")[0] for s in path.split("/")),
    "iis": lambda path: "/".join(s.rstrip(" .") for s in path.lower().split("/")),
    "case_insensitive": str.lower,
    "merge_slashes": lambda path: "/" + "/".join(s for s in path.split("/") if s),
}

SPOOFABLE = ["x-auth-user", "x-auth-roles", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
             "x-forwarded-port", "x-forwarded-prefix", "x-original-url", "x-rewrite-url", "x-real-ip",
             "true-client-ip", "x-client-ip", "x-http-method-override", "forwarded", "x-host"]  # fmt: skip
SET_BY_GATEWAY = {"x-forwarded-for": "127.0.0.1", "x-forwarded-proto": "http", "x-forwarded-host": "gw"}


class Capture:
    """A forwarder that records where each request went and with which headers."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, list[str]]]] = []

    async def send(self, method: str, url: Any, headers: Any, body: Any, **_: float) -> UpstreamResponse:
        seen: dict[str, list[str]] = {}
        for name, value in headers:
            seen.setdefault(name.lower(), []).append(value)
        self.sent.append((str(url), seen))
        return Answer()

    async def close(self) -> None:
        return None


segments = st.lists(
    st.builds(
        lambda word, tail: word + tail,
        st.sampled_from(["admin", "Admin", "ADMIN", "api", "API", "public", "x", "static", "a.b"]),
        st.sampled_from(["", ";", ";x", ";x=1", "%3b", "%3By", ".", "..%20", "%20", " ", "%2e", "%2E%2E", "/"]),
    ),
    min_size=1,
    max_size=4,
)


def spelled(name: str, style: int) -> str:
    separator = ["-", "_", "."][style % 3]
    cased = [str.lower, str.upper, str.title][style // 3 % 3](name)
    return cased.replace("-", separator)


spoofs = st.lists(st.tuples(st.sampled_from(SPOOFABLE), st.integers(0, 8)), max_size=6)


def forward(gateway: Gateway, raw: str, headers: list[tuple[str, str]]) -> int:
    async def go() -> int:
        transport = httpx.ASGITransport(app=gateway, client=("127.0.0.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            request = client.build_request("GET", "http://gw/", headers=headers)
            request.url = request.url.copy_with(raw_path=raw.encode())
            return (await client.send(request)).status_code

    return asyncio.run(go())


def user_token(staff: bool) -> str:
    claims = {"sub": "alice", "roles": ["user"], "is_staff": staff, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=segments, spoofed=spoofs, staff=st.booleans())
def test_the_upstream_serves_the_route_that_was_authorised(
    path: list[str], spoofed: list[tuple[str, int]], staff: bool
) -> None:
    capture = Capture()
    gateway = create_app(parse_config(CONFIG), forwarder=capture)
    raw = "/" + "/".join(path)
    headers = [("Authorization", f"Bearer {user_token(staff)}")]
    headers += [(spelled(name, style), "/admin/secret") for name, style in spoofed]
    status = forward(gateway, raw, headers)
    if not capture.sent:
        assert status in (400, 403, 404), (raw, status)
        return
    url, seen = capture.sent[0]
    authorised = urlsplit(url).hostname
    served_path = unquote(urlsplit(url).path)
    for reading, normalise in NORMALISERS.items():
        route = TABLE.match(None, normalise(served_path))
        assert route is not None and route.upstream.netloc == authorised, (raw, reading, served_path)
    for name in SPOOFABLE:
        for value in seen.get(name, []):
            assert value != "/admin/secret", (name, raw)
            assert name in SET_BY_GATEWAY or name in ("x-auth-user", "x-auth-roles"), name
    assert seen.get("x-auth-user") in (None, ["alice"]) and seen.get("x-forwarded-for") == ["127.0.0.1"]
