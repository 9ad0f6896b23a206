"""{prefix}/userinfo against real processes: `gateway serve --workers 2`, redis-server, the rotating demo IdP."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import httpx
import pytest
from support.sealed import refresh_cookie
from support.servers import GatewayProcess, IdPProcess, ServerProcess, set_cookies, start_gateway, start_idp

IDP_SECRET = "userinfo-tests-hs256-secret-0123456789abcdef"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    config = {
        "store": {"url": redis_url, "key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": "store-secret-for-tests"},
        "tokens": {"algorithms": ["HS256"], "secret": IDP_SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": f"{idp.url}/token",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
        },
        "login": {"url": "https://login.test/?next={next}"},
        "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
    }
    with start_gateway(config, workers=2) as server:
        yield server


async def burst(url: str, cookie: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        return await asyncio.gather(*(client.get(url, headers={"Cookie": cookie}) for _ in range(count)))


def test_a_burst_of_userinfo_calls_refreshes_once(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session = idp.issue("alice", access_ttl=-60)
    cookie = f"{ACCESS}={session['access']}; {REFRESH}={refresh_cookie(session['refresh'], REFRESH)}"
    before = idp.stats()["refresh_calls"]
    answers = asyncio.run(burst(f"{gateway.url}/.gateway/userinfo", cookie, 20))
    assert [a.status_code for a in answers] == [200] * 20
    assert idp.stats()["refresh_calls"] - before == 1  # one refresh for the page's every call, across workers
    assert {a.json()["sub"] for a in answers} == {"alice"}
    assert all("refresh" not in a.text and session["access"] not in a.text for a in answers)
    rotated = {(set_cookies(a)[ACCESS].value, set_cookies(a)[REFRESH].value) for a in answers}
    assert len(rotated) == 1  # every racing call hands out the same successor
    access, refresh = rotated.pop()
    follow = httpx.get(
        f"{gateway.url}/.gateway/userinfo", headers={"Cookie": f"{ACCESS}={access}; {REFRESH}={refresh}"}
    )
    assert follow.status_code == 200 and "set-cookie" not in follow.headers
    assert idp.stats()["refresh_calls"] - before == 1


def test_without_a_session_a_browser_gets_json_not_a_redirect(gateway: GatewayProcess) -> None:
    answer = httpx.get(
        f"{gateway.url}/.gateway/userinfo", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
    )
    assert answer.status_code == 401 and answer.json() == {"error": "invalid_token", "reason": "no_token"}
