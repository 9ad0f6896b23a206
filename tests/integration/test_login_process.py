"""OIDC login run by the gateway, against the demo IdP as a real OpenID provider (RS256, discovery, PKCE)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from support.configs import demo_refresh, oidc_login
from support.servers import (
    GatewayProcess,
    IdPProcess,
    start_gateway,
    start_idp,
    start_upstream,
)


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(algorithm="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, redis_url: str) -> Iterator[GatewayProcess]:
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with start_upstream() as upstream:

        def config(port: int) -> dict[str, Any]:  # the gateway's own URL is in it: written for the port it gets
            return {
                "store": {"url": redis_url, "key_prefix": prefix, "secret": "login-tests-secret"},
                "tokens": {
                    "algorithms": ["RS256"],
                    "jwks_url": f"{idp.url}/jwks",
                    "issuer": idp.url,
                    "audience": "legacy-app",
                },
                "refresh": demo_refresh(idp),
                "cookies": {"secure": False},
                "login": oidc_login(idp, port),
                "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
            }

        with start_gateway(config, workers=2) as server:
            yield server


def cookies_of(response: httpx.Response) -> dict[str, str]:
    jar: dict[str, str] = {}
    for line in response.headers.get_list("set-cookie"):
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(line)
        jar.update({name: morsel.value for name, morsel in parsed.items()})
    return jar


def start_login(gateway: GatewayProcess, path: str = "/reports?year=2024") -> tuple[str, str]:
    """A browser navigation without a session: returns (authorize URL, the gateway's login-state cookie)."""
    first = httpx.get(f"{gateway.url}{path}", headers={"Accept": "text/html"})
    assert first.status_code == 302
    login = first.headers["location"]
    assert login.startswith("/.gateway/login?next=")
    to_idp = httpx.get(f"{gateway.url}{login}")
    assert to_idp.status_code == 302
    return to_idp.headers["location"], cookies_of(to_idp)["gw_oidc"]


def test_browser_login_round_trip(gateway: GatewayProcess, idp: IdPProcess) -> None:
    authorize, state_cookie = start_login(gateway)
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"] and query["state"]
    assert "openid" in query["scope"][0]
    callback = idp.sign_in(authorize, "bob")
    assert callback.startswith(f"{gateway.url}/.gateway/callback?")
    done = httpx.get(callback, headers={"Cookie": f"gw_oidc={state_cookie}"})
    assert done.status_code == 302 and done.headers["location"] == "/reports?year=2024"
    session = cookies_of(done)
    assert session["gw_oidc"] == "" and session["gw_access"] and session["gw_refresh"]
    assert session["gw_refresh"] not in done.text and session["gw_refresh"] not in done.headers["location"]
    page = httpx.get(
        f"{gateway.url}/reports?year=2024",
        headers={"Cookie": f"gw_access={session['gw_access']}; gw_refresh={session['gw_refresh']}"},
    )
    assert page.status_code == 200
    assert ["x-auth-user", "bob"] in page.json()["headers"]


def test_replayed_or_forged_state_is_refused(gateway: GatewayProcess, idp: IdPProcess) -> None:
    authorize, state_cookie = start_login(gateway)
    callback = idp.sign_in(authorize)
    assert httpx.get(callback, headers={"Cookie": f"gw_oidc={state_cookie}"}).status_code == 302
    replay = httpx.get(callback, headers={"Cookie": f"gw_oidc={state_cookie}"})
    assert replay.status_code == 400 and "gw_access" not in cookies_of(replay)
    authorize, state_cookie = start_login(gateway)
    forged = idp.sign_in(authorize).replace("state=", "state=x")
    refused = httpx.get(forged, headers={"Cookie": f"gw_oidc={state_cookie}"})
    assert refused.status_code == 400 and refused.json()["reason"] == "login_state_invalid"
    assert not cookies_of(refused).get("gw_access")
    no_cookie = httpx.get(idp.sign_in(start_login(gateway)[0]))
    assert no_cookie.status_code == 400 and no_cookie.json()["reason"] == "login_state_missing"


@pytest.mark.parametrize("evil", ["//evil.example/x", "/\\evil.example", "https://evil.example/", "/%09/evil.example"])
def test_next_never_leaves_the_site(gateway: GatewayProcess, idp: IdPProcess, evil: str) -> None:
    to_idp = httpx.get(f"{gateway.url}/.gateway/login", params={"next": evil})
    callback = idp.sign_in(to_idp.headers["location"])
    done = httpx.get(callback, headers={"Cookie": f"gw_oidc={cookies_of(to_idp)['gw_oidc']}"})
    assert done.status_code == 302 and done.headers["location"] == "/"


def test_xhr_without_session_gets_401_with_login_url(gateway: GatewayProcess) -> None:
    response = httpx.get(f"{gateway.url}/api/items", headers={"Accept": "application/json", "Sec-Fetch-Mode": "cors"})
    assert response.status_code == 401
    assert response.json()["login_url"] == "/.gateway/login?next=%2Fapi%2Fitems"


def test_a_login_over_a_big_token_session_clears_its_numbered_cookies(gateway: GatewayProcess, idp: IdPProcess) -> None:
    """Issue 16, item 2: chunks left beside the new plain cookies would make the session read as garbage."""
    authorize, state_cookie = start_login(gateway)
    callback = idp.sign_in(authorize, "bob")
    old = "gw_access_0=old; gw_access_1=old; gw_refresh_0=old"
    done = httpx.get(callback, headers={"Cookie": f"gw_oidc={state_cookie}; {old}"})
    assert done.status_code == 302
    lines = done.headers.get_list("set-cookie")
    assert {line.split("=", 1)[0] for line in lines if "Max-Age=0" in line} == {
        "gw_oidc",
        "gw_access_0",
        "gw_access_1",
        "gw_refresh_0",
    }
    session = cookies_of(done)
    page = httpx.get(
        f"{gateway.url}/reports",
        headers={"Cookie": f"gw_access={session['gw_access']}; gw_refresh={session['gw_refresh']}"},
    )
    assert page.status_code == 200 and ["x-auth-user", "bob"] in page.json()["headers"]
