"""CORS preflights through `gateway serve` and the echo upstream (which answers with the headers it received):
`preflight: upstream` forwards them with nobody's identity, `cors` has the gateway answer them itself."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from support.servers import GatewayProcess, ServerProcess, start_gateway

SECRET = "cors-process-secret-0123456789abcdef"
SPA = "http://spa.example:3000"


@pytest.fixture(scope="module")
def gateway(upstream: ServerProcess) -> Iterator[GatewayProcess]:
    config: dict[str, Any] = {
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "cookies": {"secure": False},
        "identity": {"forward_token": True},
        "routes": [
            {"name": "legacy", "path": "/legacy/", "upstream": upstream.url, "preflight": "upstream"},
            {
                "name": "api",
                "path": "/api/",
                "upstream": upstream.url,
                "cors": {"allowed_origins": [SPA], "allowed_headers": ["X-Spa"], "allow_credentials": True},
            },
            {"name": "app", "path": "/", "upstream": upstream.url},
        ],
    }
    with start_gateway(config) as server:
        yield server


def token() -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


def preflight(**extra: str) -> dict[str, str]:
    return {"Origin": SPA, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "x-spa", **extra}


def test_a_forwarded_preflight_reaches_the_upstream_with_no_identity(gateway: GatewayProcess) -> None:
    spoof = {
        **preflight(),
        "Authorization": f"Bearer {token()}",
        "X-Auth-User": "root",
        "Cookie": f"gw_access={token()}; app=1",
    }
    response = httpx.options(f"{gateway.url}/legacy/items", headers=spoof)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["method"] == "OPTIONS"
    received = {name: value for name, value in echoed["headers"]}
    assert received["origin"] == SPA and received["access-control-request-method"] == "PUT"
    assert not {"authorization", "x-auth-user", "x-auth-email", "x-auth-roles"} & set(received), received
    assert received["cookie"] == "app=1"  # the gateway's cookies are cut, the app's own pass
    assert "set-cookie" not in response.headers
    # Without the key the same preflight is refused, as any request without a credential is.
    assert httpx.options(f"{gateway.url}/other", headers=preflight()).status_code == 401


def test_the_gateway_answers_a_cors_routes_preflight_and_sets_the_cors_headers(gateway: GatewayProcess) -> None:
    answered = httpx.options(f"{gateway.url}/api/items", headers=preflight())
    assert answered.status_code == 204 and answered.content == b""  # the echo upstream would have said 200 JSON
    assert answered.headers["access-control-allow-origin"] == SPA
    assert answered.headers["access-control-allow-credentials"] == "true"
    assert answered.headers["access-control-allow-headers"] == "X-Spa"
    assert "PUT" in answered.headers["access-control-allow-methods"].split(", ")
    refused = httpx.options(f"{gateway.url}/api/items", headers=preflight(Origin="http://evil.example"))
    assert refused.status_code == 403 and refused.json()["reason"] == "cors_origin"
    assert not [k for k in refused.headers if k.startswith("access-control-")]
    # The request that follows: forwarded as the user, and readable by the SPA.
    actual = httpx.put(f"{gateway.url}/api/items", headers={"Origin": SPA, "Authorization": f"Bearer {token()}"})
    assert actual.status_code == 200 and dict(actual.json()["headers"])["x-auth-user"] == "alice"
    assert actual.headers["access-control-allow-origin"] == SPA and actual.headers["vary"] == "Origin"
