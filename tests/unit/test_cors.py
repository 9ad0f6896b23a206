"""gateway/cors.py in the request path: preflights forwarded as nobody (`preflight: upstream`) or answered by the
gateway (`cors`), the CORS headers of every answer on a cors route, and the CSRF trust given to its origins."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from unittest.mock import ANY

import httpx
import jwt
import pytest
from support.fakes import Answer, RecordingUpstream

from gateway.app import Gateway, create_app
from gateway.config import parse_config
from gateway.cors import is_preflight

SECRET = "cors-tests-secret-0123456789abcdef"
SPA = "https://spa.example"
EVIL = "https://evil.example"
PREFLIGHT = {"Origin": SPA, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "x-spa"}


class CORSAnswer(Answer):
    """An app that sets CORS headers of its own, which a cors route must not let through."""

    headers: Sequence[tuple[bytes, bytes]] = (
        (b"content-length", b"2"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, PATCH"),
        (b"x-app", b"1"),
    )


class Upstream(RecordingUpstream):
    """Records method and headers of what it gets; answers with the app's own CORS headers."""

    def __init__(self) -> None:
        super().__init__()
        self.methods: list[str] = []

    async def send(self, method: str, url: Any, headers: Any, body: Any, **_: float) -> Any:
        self.methods.append(method)
        self.seen.append(dict(headers))
        return CORSAnswer()


def build(*routes: dict[str, Any], forward_token: bool = False) -> tuple[Gateway, Upstream]:
    upstream = Upstream()
    config = parse_config(
        {
            "server": {"access_log": False},
            "tokens": {"algorithms": ["HS256"], "secret": SECRET, "leeway": 0},
            "cookies": {"secure": False},
            "identity": {"forward_token": forward_token},
            "routes": [*routes, {"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
        }
    )
    return create_app(config, forwarder=upstream), upstream


def token(sub: str = "alice", ttl: float = 600) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


async def call(
    app: Gateway, method: str, path: str, headers: dict[str, str] | None = None, cookies: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw.example", cookies=cookies
    ) as client:
        return await client.request(method, path, headers=headers, content=b"{}" if method == "POST" else None)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


SPA_API = {
    "name": "api",
    "path": "/api/",
    "upstream": "http://127.0.0.1:9",
    "cors": {
        "allowed_origins": [SPA, "http://localhost:3000"],
        "allowed_headers": ["X-Spa", "Content-Type"],
        "expose_headers": ["X-App"],
        "allow_credentials": True,
        "max_age": 300,
    },
}
FORWARDED = {"name": "legacy", "path": "/legacy/", "upstream": "http://127.0.0.1:9", "preflight": "upstream"}


# --- preflight: upstream ------------------------------------------------------------------------


async def test_preflight_upstream_forwards_the_preflight_unauthenticated_and_the_default_still_refuses_it() -> None:
    app, upstream = build(FORWARDED)
    forwarded = await call(app, "OPTIONS", "/legacy/x", PREFLIGHT)
    assert forwarded.status_code == 200 and upstream.methods == ["OPTIONS"]
    assert upstream.seen[0]["origin"] == SPA and upstream.seen[0]["access-control-request-method"] == "PUT"
    # The same preflight on a route without the key: a request like any other, and browsers send it bare.
    refused = await call(app, "OPTIONS", "/x", PREFLIGHT)
    assert refused.status_code == 401 and refused.json()["reason"] == "no_token"
    assert upstream.methods == ["OPTIONS"]


async def test_a_forwarded_preflight_carries_no_identity_no_authorization_no_token_and_sets_no_cookie() -> None:
    app, upstream = build(FORWARDED, forward_token=True)
    spoofed = {**PREFLIGHT, "Authorization": f"Bearer {token('alice')}", "X-Auth-User": "root", "X-Auth-Roles": "admin"}
    response = await call(app, "OPTIONS", "/legacy/x", spoofed, cookies={"gw_access": token("bob", ttl=-60)})
    assert response.status_code == 200
    assert "set-cookie" not in response.headers  # an expired access cookie is neither cleared nor refreshed
    seen = {k.lower(): v for k, v in upstream.seen[0].items()}
    assert not {"authorization", "x-auth-user", "x-auth-email", "x-auth-roles"} & set(seen), seen
    assert "gw_access" not in seen.get("cookie", "")
    # The same credentials on a real request to the route do authenticate (forward_token: the verified one).
    await call(app, "GET", "/legacy/x", {"Authorization": f"Bearer {token('alice')}", "Origin": SPA})
    assert upstream.seen[1]["x-auth-user"] == "alice" and upstream.seen[1]["authorization"].startswith("Bearer ")


@pytest.mark.parametrize("headers", [{"Origin": SPA}, {"Access-Control-Request-Method": "PUT"}, {}])
async def test_an_options_that_is_not_a_preflight_is_authenticated_like_any_request(headers: dict[str, str]) -> None:
    app, upstream = build(FORWARDED)
    refused = await call(app, "OPTIONS", "/legacy/x", headers)
    assert refused.status_code == 401 and upstream.methods == []
    allowed = await call(app, "OPTIONS", "/legacy/x", {**headers, "Authorization": f"Bearer {token()}"})
    assert allowed.status_code == 200 and upstream.seen[0]["x-auth-user"] == "alice"


# --- cors: preflights answered by the gateway ----------------------------------------------------


async def test_the_gateway_answers_a_preflight_from_an_allowed_origin_without_the_upstream() -> None:
    app, upstream = build(SPA_API)
    response = await call(app, "OPTIONS", "/api/items/1", PREFLIGHT)
    assert response.status_code == 204 and upstream.methods == []
    assert cors_headers(response) == {
        "access-control-allow-origin": SPA,
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        "access-control-allow-headers": "X-Spa, Content-Type",
        "access-control-max-age": "300",
    }
    assert "Origin" in response.headers["vary"] and "Access-Control-Request-Headers" in response.headers["vary"]
    assert response.headers["x-request-id"]


async def test_a_preflight_from_an_origin_not_allowed_is_403_without_cors_headers_and_never_forwarded() -> None:
    app, upstream = build(SPA_API)
    for origin in (EVIL, "null", "https://spa.example.evil.example", "http://spa.example"):
        response = await call(app, "OPTIONS", "/api/items/1", {**PREFLIGHT, "Origin": origin})
        assert response.status_code == 403 and response.json()["reason"] == "cors_origin", origin
        assert cors_headers(response) == {}
    assert upstream.methods == []


async def test_preflights_are_answered_even_where_options_is_not_forwarded() -> None:
    app, upstream = build({**SPA_API, "methods": ["GET", "PUT"], "cors": {"allowed_origins": [SPA]}})
    response = await call(app, "OPTIONS", "/api/x", PREFLIGHT)
    assert response.status_code == 204 and response.headers["access-control-allow-methods"] == "GET, PUT"
    assert "access-control-allow-credentials" not in response.headers
    assert (await call(app, "OPTIONS", "/api/x", {"Authorization": f"Bearer {token()}"})).status_code == 405


# --- cors: the headers of every other answer -----------------------------------------------------


async def test_an_answer_to_an_allowed_origin_carries_the_gateways_cors_headers_not_the_apps() -> None:
    app, upstream = build(SPA_API)
    response = await call(app, "GET", "/api/items", {"Origin": SPA, "Authorization": f"Bearer {token()}"})
    assert response.status_code == 200 and upstream.seen[0]["x-auth-user"] == "alice"
    assert cors_headers(response) == {
        "access-control-allow-origin": SPA,
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-App",
    }
    assert response.headers.get_list("vary") == ["Origin"] and response.headers["x-app"] == "1"


async def test_an_answer_to_another_origin_carries_no_cors_header_not_even_the_apps() -> None:
    app, _ = build(SPA_API)
    for headers in ({"Origin": EVIL}, {}):
        response = await call(app, "GET", "/api/items", {**headers, "Authorization": f"Bearer {token()}"})
        assert response.status_code == 200 and cors_headers(response) == {}
        assert response.headers["vary"] == "Origin"
    # A route without cors is left as the app answers.
    plain = await call(app, "GET", "/x", {"Origin": EVIL, "Authorization": f"Bearer {token()}"})
    assert plain.headers["access-control-allow-origin"] == "*" and "vary" not in plain.headers


async def test_the_gateways_own_refusals_on_a_cors_route_are_readable_by_the_allowed_origin() -> None:
    app, _ = build(SPA_API)
    refused = await call(app, "GET", "/api/items", {"Origin": SPA})
    assert refused.status_code == 401 and refused.json()["reason"] == "no_token"
    assert refused.headers["access-control-allow-origin"] == SPA
    assert refused.headers["access-control-allow-credentials"] == "true"
    other = await call(app, "GET", "/api/items", {"Origin": EVIL})
    assert other.status_code == 401 and cors_headers(other) == {}


async def test_any_origin_without_credentials_gets_a_wildcard() -> None:
    app, _ = build({**SPA_API, "cors": {"allowed_origins": ["*"]}})
    preflight = await call(app, "OPTIONS", "/api/x", {**PREFLIGHT, "Origin": EVIL})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in preflight.headers
    answer = await call(app, "GET", "/api/x", {"Origin": EVIL, "Authorization": f"Bearer {token()}"})
    assert cors_headers(answer) == {"access-control-allow-origin": "*"}
    # Without an Origin too: a shared cache may hand this answer to a cross-origin page later.
    same_origin = await call(app, "GET", "/api/x", {"Authorization": f"Bearer {token()}"})
    assert cors_headers(same_origin) == {"access-control-allow-origin": "*"}


# --- cors and CSRF -------------------------------------------------------------------------------

CROSS_SITE_POST = {"Origin": SPA, "Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}


async def test_a_credentialed_cors_origin_may_post_on_the_session_cookie_and_no_other_origin_may() -> None:
    app, upstream = build(SPA_API)
    session = {"gw_access": token()}
    allowed = await call(app, "POST", "/api/items", CROSS_SITE_POST, cookies=session)
    assert allowed.status_code == 200 and upstream.seen[-1]["x-auth-user"] == "alice"
    assert allowed.headers["access-control-allow-origin"] == SPA
    refused = await call(app, "POST", "/api/items", {**CROSS_SITE_POST, "Origin": EVIL}, cookies=session)
    assert refused.status_code == 403 and refused.json()["reason"] == "csrf"
    # Trust is per route: the SPA's origin is still a forgery on a route without its cors.
    elsewhere = await call(app, "POST", "/x", CROSS_SITE_POST, cookies=session)
    assert elsewhere.status_code == 403 and elsewhere.json()["reason"] == "csrf"
    assert len(upstream.seen) == 1


async def test_a_cors_origin_without_credentials_is_not_trusted_with_the_session() -> None:
    app, upstream = build({**SPA_API, "cors": {"allowed_origins": [SPA]}})
    refused = await call(app, "POST", "/api/items", CROSS_SITE_POST, cookies={"gw_access": token()})
    assert refused.status_code == 403 and refused.json()["reason"] == "csrf" and upstream.seen == []


async def test_a_credentialed_cors_origin_may_open_a_websocket_on_the_session_on_that_route_only() -> None:
    app, _ = build(SPA_API)
    admission, routes = app.serving.http._admission, app.serving.http._routes

    def handshake(origin: str) -> dict[str, Any]:
        headers = [(b"host", b"gw.example"), (b"origin", origin.encode()), (b"cookie", f"gw_access={token()}".encode())]
        return {"type": "websocket", "scheme": "ws", "client": ("127.0.0.1", 1), "headers": headers}

    api, other = routes.match(None, "/api/live"), routes.match(None, "/live")
    assert api is not None and other is not None
    assert (await admission.websocket(handshake(SPA), api)).claims == {"sub": "alice", "exp": ANY}
    assert (await admission.websocket(handshake(EVIL), api)).refused == "csrf"
    assert (await admission.websocket(handshake(SPA), other)).refused == "csrf"


def test_a_preflight_is_an_options_with_origin_and_access_control_request_method() -> None:
    def scope(method: str, *names: bytes) -> dict[str, Any]:
        return {"method": method, "headers": [(n, b"x") for n in names]}

    assert is_preflight(scope("OPTIONS", b"origin", b"access-control-request-method"))
    assert not is_preflight(scope("OPTIONS", b"origin"))
    assert not is_preflight(scope("OPTIONS", b"access-control-request-method"))
    assert not is_preflight(scope("GET", b"origin", b"access-control-request-method"))
