"""Cookie mode with big tokens against real processes: `gateway serve` (two workers), redis-server, the demo IdP
padding its access tokens with a `groups` claim as Entra ID does (issue 16, item 2).

A 7 KB access token travels in numbered cookies, each Set-Cookie under the browser's 4096 bytes, through a JSON
login (capture), requests on either worker, refreshes and a logout that clears every chunk; past
`cookies.max_total` the gateway refuses at login and at refresh with 502 `cookie_too_large` and says why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support.sealed import STORE_SECRET, refresh_cookie
from support.servers import GatewayProcess, IdPProcess, ServerProcess, start_gateway, start_idp

IDP_SECRET = "bigcookies-tests-hs256-secret-0123456789abcdef"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"
ACCESS_TTL = 3
MAX_TOTAL = 9000
SEVEN_KB = 132  # groups: an HS256 access token of about 7.2 KB
TOO_BIG = 200  # about 10.9 KB: past MAX_TOTAL


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET, access_ttl=ACCESS_TTL) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    config = {
        "server": {"access_log": False},
        "store": {"url": redis_url, "key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": STORE_SECRET},
        "tokens": {
            "algorithms": ["HS256"],
            "secret": IDP_SECRET,
            "audience": "legacy-app",
            "leeway": 0,
            "refresh_before": 1,
        },
        "refresh": {
            "endpoint": f"{idp.url}/token",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "revocation_endpoint": f"{idp.url}/revoke",
        },
        "cookies": {"max_total": MAX_TOTAL},
        "routes": [
            {
                "name": "login",
                "path": "/api/token/",
                "upstream": idp.url,
                "auth": "none",
                "capture": {"access": "access", "refresh": "refresh"},
            },
            {"name": "app", "path": "/", "upstream": upstream.url},
        ],
    }
    with start_gateway(config, workers=2) as server:
        yield server


@pytest.fixture
def groups(idp: IdPProcess) -> Iterator[Any]:
    """Set how many groups the IdP's access tokens carry; back to none after the test."""
    yield lambda count: idp.behaviour(groups=count)
    idp.behaviour(groups=0)


class Browser:
    """A cookie jar that keeps what the gateway sets, as a browser does, and records every Set-Cookie line."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.cookies: dict[str, str] = {}
        self.lines: list[str] = []

    def send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        header = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = httpx.request(method, self.gateway.url + path, headers={"cookie": header}, timeout=30, **kw)
        for line in response.headers.get_list("set-cookie"):
            self.lines.append(line)
            name, _, rest = line.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in line:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return response


def user_and_cookie_upstream(response: httpx.Response) -> tuple[str | None, str]:
    """What the echo upstream saw: the identity header and the Cookie header."""
    headers = {name.lower(): value for name, value in response.json()["headers"]}
    return headers.get("x-auth-user"), headers.get("cookie", "")


def test_a_7_kb_access_token_lives_in_numbered_cookies_through_login_refreshes_and_logout(
    gateway: GatewayProcess, idp: IdPProcess, groups: Any
) -> None:
    groups(SEVEN_KB)
    browser = Browser(gateway)
    login = browser.send("POST", "/api/token/", json={"username": "alice", "password": "alice"})
    assert login.status_code == 200, login.text
    assert len(login.json()["access"]) > 7000
    assert sorted(browser.cookies) == [ACCESS + "_0", ACCESS + "_1", REFRESH]
    calls = idp.stats()["refresh_calls"]
    for _ in range(4):  # both workers join the chunks; no refresh while the token is fresh
        page = browser.send("GET", "/app")
        assert page.status_code == 200, page.text
        user, cookie = user_and_cookie_upstream(page)
        assert user == "alice" and "gw_" not in cookie
    assert idp.stats()["refresh_calls"] == calls
    for round in (1, 2):  # the access token expires; each refresh sets the chunks again
        time.sleep(ACCESS_TTL + 0.5)
        page = browser.send("GET", "/app")
        assert page.status_code == 200, page.text
        assert user_and_cookie_upstream(page)[0] == "alice"
        assert idp.stats()["refresh_calls"] == calls + round
        assert sorted(browser.cookies) == [ACCESS + "_0", ACCESS + "_1", REFRESH]
    assert idp.stats()["reuse_detected"] == 0
    out = browser.send("POST", "/.gateway/logout")
    assert out.status_code == 204
    assert browser.cookies == {}  # every chunk cleared, and the plain names
    assert all(len(line.encode()) < 4096 for line in browser.lines), max(len(line) for line in browser.lines)
    assert max(len(line.encode()) for line in browser.lines) > 3500  # the chunks were near the limit


def test_tokens_past_max_total_are_refused_at_login_and_at_refresh(
    gateway: GatewayProcess, idp: IdPProcess, groups: Any
) -> None:
    groups(TOO_BIG)
    seen = len(gateway.log())
    login = httpx.post(f"{gateway.url}/api/token/", json={"username": "alice", "password": "alice"}, timeout=30)
    assert login.status_code == 502 and login.json()["reason"] == "cookie_too_large"
    assert "set-cookie" not in login.headers and "refresh" not in login.text
    session = idp.issue("alice", access_ttl=-60)
    cookie = f"{REFRESH}={refresh_cookie(session['refresh'], REFRESH)}"
    page = httpx.get(f"{gateway.url}/app", headers={"cookie": cookie}, timeout=30)
    assert page.status_code == 502 and page.json()["reason"] == "cookie_too_large"
    cleared = {line.split("=", 1)[0] for line in page.headers.get_list("set-cookie") if "Max-Age=0" in line}
    assert cleared == {ACCESS, REFRESH}
    told = gateway.log()[seen:]
    assert told.count("do not fit in cookies (cookies.max_total: 9000); use session: {mode: server}") == 2, told
