"""The sealed refresh cookie against real processes: `gateway serve`, redis-server, the demo IdP (issue 14, item 10).

A refresh cookie the gateway did not seal never reaches the IdP and never writes to the store; the
browser never holds the refresh token in plain text; with `cookies.refresh.sealed: false`, raw
cookies work and never-seen tokens are limited per client (429). Counters are deltas.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import redis
from support.sealed import STORE_SECRET, refresh_cookie, refresh_token_in
from support.servers import GatewayProcess, IdPProcess, ServerProcess, set_cookies, start_gateway, start_idp

from gateway.sealing import Sealer
from gateway.throttle import BURST

IDP_SECRET = "sealed-tests-hs256-secret-0123456789abcdef"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"


def gateway_config(idp: IdPProcess, upstream: ServerProcess, redis_url: str, **refresh_cookie: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": False, "trusted_proxies": ["127.0.0.1"]},
        "store": {"url": redis_url, "key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": STORE_SECRET},
        "tokens": {"algorithms": ["HS256"], "secret": IDP_SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": f"{idp.url}/token",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
            "revocation_endpoint": f"{idp.url}/revoke",
            "grace_period": 10,
        },
        "cookies": {"refresh": {"name": "gw_refresh", "max_age": 1209600, **refresh_cookie}},
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


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    """Sealed refresh cookies (the default), two workers: one seals, the other opens."""
    with start_gateway(gateway_config(idp, upstream, redis_url), workers=2) as server:
        yield server


@pytest.fixture
def raw_gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    """`cookies.refresh.sealed: false`, one worker (the limit is per worker), a fresh limit for each test."""
    with start_gateway(gateway_config(idp, upstream, redis_url, sealed=False), workers=1) as server:
        yield server


# --- helpers ----------------------------------------------------------------------------------------


def key_prefix(gateway: GatewayProcess) -> str:
    config = gateway.config
    assert isinstance(config, dict)
    return str(config["store"]["key_prefix"])


def footprint(gateway: GatewayProcess, redis_url: str) -> tuple[frozenset[bytes], int]:
    """Every key the gateway holds in Redis, and how many entries its denylist has."""
    prefix = key_prefix(gateway)
    with redis.Redis.from_url(redis_url) as client:
        keys = frozenset(client.scan_iter(match=f"{prefix}*", count=1000))
        return keys, int(client.zcard(f"{prefix}denylist"))


def idp_calls(idp: IdPProcess) -> tuple[int, int]:
    stats = idp.stats()
    return stats["refresh_calls"], stats["revocations"]


def get(gateway: GatewayProcess, cookie: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{gateway.url}/app", headers={"Cookie": cookie, **headers}, timeout=30)


def log_in(gateway: GatewayProcess, user: str = "alice") -> httpx.Response:
    response = httpx.post(f"{gateway.url}/api/token/", json={"username": user, "password": user}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def junk_cookies(count: int, idp: IdPProcess, *, raw_tokens: bool = True) -> list[str]:
    """What an unauthenticated client may put in the refresh cookie: made-up values, with or without a real
    expired access token, and (``raw_tokens``) real raw refresh tokens, as a cookie set before sealing."""
    expired = idp.issue("mallory", access_ttl=-60)
    cookies = []
    for n in range(count):
        value = idp.issue("mallory")["refresh"] if raw_tokens and n % 3 == 0 else os.urandom(24).hex()
        cookies.append(f"{REFRESH}={value}" + (f"; {ACCESS}={expired['access']}" if n % 2 else ""))
    return cookies


# --- a cookie the gateway did not seal ----------------------------------------------------------------


def test_junk_refresh_cookies_never_reach_the_idp_nor_the_store(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str
) -> None:
    """Regression (issue 14, item 10): 50 junk cookies were 50 IdP calls, 100 store keys and 50 denylist entries."""
    cookies = junk_cookies(50, idp)
    calls, store = idp_calls(idp), footprint(gateway, redis_url)
    responses = [get(gateway, cookie) for cookie in cookies]
    assert {r.status_code for r in responses} == {401}
    assert {r.json()["reason"] for r in responses} <= {"no_token", "token_expired"}
    for response in responses:  # the browser is told to drop it
        assert set_cookies(response)[REFRESH]["max-age"] == "0"
    assert idp_calls(idp) == calls
    assert footprint(gateway, redis_url) == store


def test_logout_with_a_junk_refresh_cookie_calls_nothing_and_writes_nothing(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str
) -> None:
    """Regression (issue 14, item 10): a logout with any refresh cookie ended a "family" and revoked it at the IdP."""
    cookies = [f"{REFRESH}={os.urandom(24).hex()}", f"{REFRESH}={idp.issue('mallory')['refresh']}"]
    calls, store = idp_calls(idp), footprint(gateway, redis_url)
    for cookie in cookies * 5:
        response = httpx.post(f"{gateway.url}/.gateway/logout", headers={"Cookie": cookie}, timeout=30)
        assert response.status_code == 204
        assert set_cookies(response)[REFRESH]["max-age"] == "0"
    assert idp_calls(idp) == calls
    assert footprint(gateway, redis_url) == store


def test_a_cookie_sealed_under_another_name_or_secret_is_refused(gateway: GatewayProcess, idp: IdPProcess) -> None:
    expired = idp.issue("alice", access_ttl=-60)
    token = expired["refresh"]
    forged = {
        "another secret": Sealer("another-store-secret").seal_cookie(token, REFRESH),
        "the access cookie": Sealer(STORE_SECRET).seal_cookie(token, ACCESS),
        "the unprefixed name": Sealer(STORE_SECRET).seal_cookie(token, "gw_refresh"),
        "the store's key": Sealer(STORE_SECRET).seal(token.encode(), REFRESH).hex(),
    }
    calls = idp_calls(idp)
    for what, value in forged.items():
        response = get(gateway, f"{ACCESS}={expired['access']}; {REFRESH}={value}")
        assert response.status_code == 401, what
    assert idp_calls(idp) == calls
    # The same token sealed as the gateway seals it is a working session.
    good = get(gateway, f"{ACCESS}={expired['access']}; {REFRESH}={refresh_cookie(token, REFRESH)}")
    assert good.status_code == 200 and idp_calls(idp)[0] == calls[0] + 1


# --- the browser never holds the refresh token ------------------------------------------------------------


def test_the_browser_holds_the_refresh_token_only_sealed_and_the_gateway_refreshes_from_it(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    response = log_in(gateway)
    value = set_cookies(response)[REFRESH].value
    token = refresh_token_in(value, REFRESH)
    assert token is not None, "the refresh cookie holds a token sealed by the gateway"
    assert token not in value and "eyJ" not in value and token not in response.text
    # It is the IdP's refresh token: the newest of alice's sessions at the IdP.
    claims = jwt.decode(token, options={"verify_signature": False})
    newest = [f for f in idp.families() if f["username"] == "alice"][-1]
    assert claims["token_type"] == "refresh" and claims["jti"] == newest["current"]
    # A browser with that cookie and no access token (expired and gone) gets a refresh, on either worker.
    calls = idp_calls(idp)[0]
    rotated = {get(gateway, f"{REFRESH}={value}").status_code for _ in range(4)}
    assert rotated == {200} and idp_calls(idp)[0] == calls + 1
    successor = set_cookies(get(gateway, f"{REFRESH}={value}"))[REFRESH].value  # within grace: the same successor
    assert successor != value and refresh_token_in(successor, REFRESH) not in (None, token)


# --- cookies.refresh.sealed: false ------------------------------------------------------------------------


def test_raw_cookies_work_and_never_seen_tokens_are_limited_per_client(
    raw_gateway: GatewayProcess, idp: IdPProcess, redis_url: str
) -> None:
    """Raw refresh cookies (dj-rest-auth sets its own): each never-seen token costs an IdP call, so a client gets
    a burst of them, then 429 without the IdP hearing of it."""
    gateway, client, other = raw_gateway, {"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8"}
    login = log_in(gateway, "bob")
    raw = set_cookies(login)[REFRESH].value
    assert jwt.decode(raw, options={"verify_signature": False})["token_type"] == "refresh"  # as the IdP issued it
    calls = idp_calls(idp)[0]
    answers = [get(gateway, cookie, **client) for cookie in junk_cookies(BURST + 8, idp, raw_tokens=False)]
    statuses = [r.status_code for r in answers]
    assert statuses == [401] * BURST + [429] * 8, statuses
    assert {r.json()["reason"] for r in answers[BURST:]} == {"refresh_rate_limited"}
    assert all(r.headers["retry-after"] == "5" for r in answers[BURST:])
    assert idp_calls(idp)[0] == calls + BURST  # the IdP heard of the burst only
    store = footprint(gateway, redis_url)
    for cookie in junk_cookies(5, idp, raw_tokens=False):  # over the limit: nothing is written either
        assert get(gateway, cookie, **client).status_code == 429
    assert footprint(gateway, redis_url) == store and idp_calls(idp)[0] == calls + BURST
    # Another client has a limit of its own; a token the gateway handed out is never limited.
    assert get(gateway, junk_cookies(1, idp, raw_tokens=False)[0], **other).status_code == 401
    session = get(gateway, f"{REFRESH}={raw}", **client)
    assert session.status_code == 200 and "bob" in session.text
    # A raw token straight from the IdP (set by the app itself) works too, from a client within its limit.
    issued = idp.issue("carol", access_ttl=-60)
    cookie = f"{ACCESS}={issued['access']}; {REFRESH}={issued['refresh']}"
    fresh = get(gateway, cookie, **{"X-Forwarded-For": "2001:db8::1"})
    assert fresh.status_code == 200 and "carol" in fresh.text


def test_raw_logout_with_never_seen_tokens_is_limited_too(
    raw_gateway: GatewayProcess, idp: IdPProcess, redis_url: str
) -> None:
    gateway = raw_gateway
    headers = {"X-Forwarded-For": "198.51.100.9"}
    statuses = []
    for _ in range(BURST + 3):
        cookie = f"{REFRESH}={os.urandom(24).hex()}"
        response = httpx.post(f"{gateway.url}/.gateway/logout", headers={"Cookie": cookie, **headers}, timeout=30)
        statuses.append(response.status_code)
    assert statuses == [204] * BURST + [429] * 3
    calls, store = idp_calls(idp), footprint(gateway, redis_url)
    cookie = f"{REFRESH}={os.urandom(24).hex()}"
    response = httpx.post(f"{gateway.url}/.gateway/logout", headers={"Cookie": cookie, **headers}, timeout=30)
    assert response.status_code == 429 and response.json()["reason"] == "refresh_rate_limited"
    assert idp_calls(idp) == calls and footprint(gateway, redis_url) == store


def test_with_raw_cookies_the_app_may_set_the_refresh_cookie_and_only_that_one(
    raw_gateway: GatewayProcess, gateway: GatewayProcess, idp: IdPProcess
) -> None:
    """dj-rest-auth hands the raw refresh token to the browser in its own Set-Cookie: with `sealed: false` that
    one passes; the access cookie (the gateway's) is still dropped, and with sealing on both are."""
    session = idp.issue("dora")
    bearer = {"Authorization": f"Bearer {session['access']}"}
    raw = httpx.get(f"{raw_gateway.url}/_set-cookie/{REFRESH}", headers=bearer)
    assert raw.status_code == 200 and [c.split("=")[0] for c in raw.headers.get_list("set-cookie")] == [
        REFRESH,
        "other",
    ]
    kept = httpx.get(f"{raw_gateway.url}/_set-cookie/{ACCESS}", headers=bearer)
    assert [c.split("=")[0] for c in kept.headers.get_list("set-cookie")] == ["other"]
    sealed = httpx.get(f"{gateway.url}/_set-cookie/{REFRESH}", headers=bearer)
    assert [c.split("=")[0] for c in sealed.headers.get_list("set-cookie")] == ["other"]
