"""Transparent refresh against real processes: `gateway serve --workers 4`, redis-server, the rotating IdP.

Every test starts its own session at the IdP, so tests share the processes but not state; IdP
call counts are read as deltas.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from support.faultproxy import FaultProxy
from support.metrics import metric_value
from support.sealed import refresh_cookie
from support.servers import (
    GatewayProcess,
    IdPProcess,
    ServerProcess,
    set_cookies,
    start_gateway,
    start_idp,
)
from support.sessionmodes import MODES, Browser, cleared, handed_out, kept, rotated, with_mode

IDP_SECRET = "refresh-tests-hs256-secret-0123456789abcdef"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"


def gateway_config(
    idp: IdPProcess, upstream: ServerProcess, store_url: str, prefix: str, **refresh: Any
) -> dict[str, Any]:
    return {
        "store": {"url": store_url, "key_prefix": prefix, "secret": "store-secret-for-tests"},
        "tokens": {"algorithms": ["HS256"], "secret": IDP_SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": f"{idp.url}/token",
            "style": "oauth2",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
            "revocation_endpoint": f"{idp.url}/revoke",
            **refresh,
        },
        "cookies": {"secure": True},
        "login": {"url": "https://login.test/?next={next}"},
        "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
    }


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with start_gateway(
        gateway_config(idp, upstream, redis_url, prefix, grace_period=3, lock_lease=2), workers=4
    ) as server:
        yield server


@pytest.fixture(autouse=True)
def healthy_idp(idp: IdPProcess) -> Iterator[None]:
    idp.reset()
    yield
    idp.reset()


def expired_session(idp: IdPProcess, user: str = "alice") -> dict[str, str]:
    return idp.issue(user, access_ttl=-60)


def cookie_header(access: str | None, refresh: str | None) -> str:
    """The cookies a browser holds: a raw refresh token (from the IdP) goes in sealed, as the gateway set it."""
    parts = []
    if access:
        parts.append(f"{ACCESS}={access}")
    if refresh:
        parts.append(f"{REFRESH}={refresh_cookie(refresh, REFRESH)}")
    return "; ".join(parts)


def refresh_calls(idp: IdPProcess) -> int:
    return idp.stats()["refresh_calls"]


async def storm(url: str, cookie: str, count: int, **headers: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(*(client.get(url, headers={"Cookie": cookie, **headers}) for _ in range(count)))


def test_500_concurrent_requests_one_idp_call(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session = expired_session(idp)
    before = refresh_calls(idp)
    responses = asyncio.run(storm(f"{gateway.url}/storm", cookie_header(session["access"], session["refresh"]), 500))
    assert [r.status_code for r in responses] == [200] * 500
    assert refresh_calls(idp) - before == 1
    new_refresh = {set_cookies(r)[REFRESH].value for r in responses}
    new_access = {set_cookies(r)[ACCESS].value for r in responses}
    assert len(new_refresh) == 1 and len(new_access) == 1
    assert new_refresh != {session["refresh"]}
    for response in responses[:5]:
        morsel = set_cookies(response)[REFRESH]
        assert morsel["httponly"] and morsel["secure"] and morsel["path"] == "/" and morsel["samesite"] == "Lax"
        assert response.headers["cache-control"] == "no-store"
        assert ("x-auth-user", "alice") in [tuple(h) for h in response.json()["headers"]]
    # The new cookies work on their own, without another IdP call.
    follow = httpx.get(f"{gateway.url}/next", headers={"Cookie": cookie_header(new_access.pop(), new_refresh.pop())})
    assert follow.status_code == 200 and "set-cookie" not in follow.headers
    assert refresh_calls(idp) - before == 1


def test_reloads_with_old_cookies_get_the_successor_then_reuse_ends_the_session(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    session = expired_session(idp)
    old = cookie_header(session["access"], session["refresh"])
    first = httpx.get(f"{gateway.url}/page", headers={"Cookie": old})
    assert first.status_code == 200
    successor = set_cookies(first)[REFRESH].value
    before = refresh_calls(idp)
    for _ in range(5):  # fast reloads and a second tab, still holding the superseded cookies
        again = httpx.get(f"{gateway.url}/page", headers={"Cookie": old})
        assert again.status_code == 200
        assert set_cookies(again)[REFRESH].value == successor
    assert refresh_calls(idp) == before

    time.sleep(3.5)  # grace_period is 3 s here
    revocations = idp.stats()["revocations"]
    late = httpx.get(f"{gateway.url}/page", headers={"Cookie": old, "Accept": "text/html"})
    assert late.status_code == 302 and late.headers["location"].startswith("https://login.test/")
    cleared = set_cookies(late)
    assert cleared[ACCESS]["max-age"] == "0" and cleared[REFRESH]["max-age"] == "0"
    assert refresh_calls(idp) == before  # the reused token never reached the IdP
    deadline = time.monotonic() + 5
    while idp.stats()["revocations"] == revocations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert idp.stats()["revocations"] == revocations + 1  # the successor was revoked (RFC 7009)
    # ...so the session is over everywhere, also for whoever holds the successor.
    stolen = httpx.get(f"{gateway.url}/page", headers={"Cookie": cookie_header(None, successor)})
    assert stolen.status_code == 401


@pytest.fixture(scope="module", params=MODES)
def moded(
    request: pytest.FixtureRequest, idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> Iterator[tuple[GatewayProcess, str]]:
    """The module's gateway in each session mode (support.sessionmodes): the same tests, the same promises."""
    if request.param == "cookie":
        yield request.getfixturevalue("gateway"), "cookie"
        return
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    config = with_mode(gateway_config(idp, upstream, redis_url, prefix, grace_period=3, lock_lease=2), "server")
    with start_gateway(config, workers=4) as server:
        yield server, "server"


def browser(moded: tuple[GatewayProcess, str], redis_url: str, tokens: dict[str, str]) -> Browser:
    gw, mode = moded
    return Browser(gw, mode, redis_url).start(tokens)


def test_idp_503_keeps_cookies_and_later_succeeds(
    moded: tuple[GatewayProcess, str], idp: IdPProcess, redis_url: str
) -> None:
    tab = browser(moded, redis_url, expired_session(idp))
    idp.behaviour(fail="503", fail_count=1)
    down = tab.get()
    assert down.status_code == 503 and down.headers["retry-after"]
    assert kept(down)
    time.sleep(2.2)  # the failure is shared with concurrent requests for 2 s, then retried
    up = tab.get()
    assert up.status_code == 200 and rotated(up, tab.mode)
    assert tab.refresh_token() not in (None, tab.first_refresh)


@pytest.mark.parametrize("fail", ["500", "503", "invalid_client"])
def test_idp_failures_that_did_not_redeem_are_503_not_logout(
    moded: tuple[GatewayProcess, str], idp: IdPProcess, redis_url: str, fail: str
) -> None:
    tab = browser(moded, redis_url, expired_session(idp))
    idp.behaviour(fail=fail, fail_count=1)
    response = tab.get()
    assert response.status_code == 503 and kept(response)
    time.sleep(2.2)  # the failure is shared for 2 s; then the same cookies work again (I2)
    again = tab.get()
    assert again.status_code == 200 and rotated(again, tab.mode)
    assert max(idp.redemption_counts().values()) == 1


@pytest.mark.parametrize("fail", ["html", "garbage"])
def test_a_200_that_is_not_json_is_503_once_and_the_token_is_never_resent(
    moded: tuple[GatewayProcess, str], idp: IdPProcess, redis_url: str, fail: str
) -> None:
    """Issue 12, failure 5: a 200 the gateway cannot read may mean the IdP redeemed the token."""
    tab = browser(moded, redis_url, expired_session(idp))
    idp.behaviour(fail=fail, fail_count=1)
    first = tab.get()
    assert first.status_code == 503 and kept(first)
    time.sleep(2.2)  # past the 2 s the failure is shared with concurrent requests: this one asks again
    later = tab.get(Accept="text/html")
    assert later.status_code == 302 and cleared(later, tab.mode)
    assert refresh_calls(idp) == 1


def test_invalid_grant_ends_the_session(moded: tuple[GatewayProcess, str], idp: IdPProcess, redis_url: str) -> None:
    session = expired_session(idp)
    httpx.post(f"{idp.url}/revoke", data={"token": session["refresh"]}, auth=("legacy-app", "demo-secret"))
    tab = browser(moded, redis_url, session)
    other_tab = tab.copy()
    api = tab.get()
    assert api.status_code == 401 and api.json()["reason"] == "invalid_grant"
    assert cleared(api, tab.mode)
    page = other_tab.get(Accept="text/html")
    assert page.status_code == 302 and cleared(page, tab.mode)
    assert refresh_calls(idp) == 1  # the refused token is not sent again


def test_a_200_without_tokens_is_502_once_then_a_clean_logout_never_a_resend(
    moded: tuple[GatewayProcess, str], idp: IdPProcess, redis_url: str
) -> None:
    """The IdP redeemed the token and its answer is unusable: the token is never sent again (I1)."""
    tab = browser(moded, redis_url, expired_session(idp))
    idp.behaviour(fail="no_access", fail_count=1)
    response = tab.get()
    assert response.status_code == 502 and kept(response)
    time.sleep(2.2)  # past the 2 s the failure is shared with concurrent requests
    later = tab.get()
    assert later.status_code == 401 and later.json()["reason"] == "refresh_lost"
    assert cleared(later, tab.mode)
    assert refresh_calls(idp) == 1 and max(idp.redemption_counts().values()) == 1


@pytest.mark.parametrize("fail", ["oversize", "dpop", "expires_zero", "wider_scope"])
def test_an_unusable_answer_is_502_once_then_a_clean_logout_never_a_resend(
    moded: tuple[GatewayProcess, str], idp: IdPProcess, redis_url: str, fail: str
) -> None:
    """Regression (issue 14, item 14): an answer over 64 KiB (streamed, no length), `token_type: DPoP`,
    `expires_in: 0` or a scope wider than the expired token's was used as new tokens. It is a redeemed token whose
    answer is unusable."""
    tab = browser(moded, redis_url, idp.issue("alice", access_ttl=-60, claims={"scope": "openid profile"}))
    idp.behaviour(fail=fail, fail_count=1)
    response = tab.get()
    assert response.status_code == 502 and response.json()["reason"] == "idp_bad_response"
    assert kept(response)
    time.sleep(2.2)  # past the 2 s the failure is shared with concurrent requests
    later = tab.get()
    assert later.status_code == 401 and later.json()["reason"] == "refresh_lost"
    assert cleared(later, tab.mode)
    assert refresh_calls(idp) == 1 and max(idp.redemption_counts().values()) == 1


def test_a_new_access_token_with_a_bad_signature_is_502_and_the_successor_is_kept(
    moded: tuple[GatewayProcess, str], idp: IdPProcess, redis_url: str
) -> None:
    session = expired_session(idp)
    tab = browser(moded, redis_url, session)
    idp.behaviour(fail="bad_signature", fail_count=1)
    response = tab.get()
    assert response.status_code == 502
    assert ACCESS not in set_cookies(response)
    successor = tab.refresh_token()  # cookie mode: the rotated refresh cookie; server mode: the record
    assert successor not in (None, session["refresh"])
    # The session carries on with the successor: the next request refreshes it, and works.
    after = tab.drop_access().get()
    assert after.status_code == 200 and refresh_calls(idp) == 2
    assert max(idp.redemption_counts().values()) == 1


def test_only_valid_expired_cookie_sessions_refresh(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session = expired_session(idp)
    before = refresh_calls(idp)
    # An expired Bearer token is an API client: 401, never a refresh from the cookie.
    bearer = httpx.get(
        f"{gateway.url}/x",
        headers={"Authorization": f"Bearer {session['access']}", "Cookie": cookie_header(None, session["refresh"])},
    )
    assert bearer.status_code == 401 and bearer.json()["reason"] == "token_expired"
    # A forged access token never reaches the IdP, and the refresh cookie is kept.
    forged = session["access"][:-4] + ("AAAA" if not session["access"].endswith("AAAA") else "BBBB")
    bad = httpx.get(f"{gateway.url}/x", headers={"Cookie": cookie_header(forged, session["refresh"])})
    assert bad.status_code == 401 and bad.json()["reason"] == "bad_signature"
    assert REFRESH not in set_cookies(bad)
    assert refresh_calls(idp) == before
    # No access cookie at all, but a refresh cookie: the session is resumed.
    resumed = httpx.get(f"{gateway.url}/x", headers={"Cookie": cookie_header(None, session["refresh"])})
    assert resumed.status_code == 200 and refresh_calls(idp) == before + 1


def test_valid_tokens_work_and_refresh_fails_closed_without_redis(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> None:
    # Redis is taken away by the fault proxy in front of it (every connection reset, new ones too): the
    # gateway's store address stays this test's own, where no other process can answer instead.
    parts = urlsplit(redis_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        url = proxy.redis_url(int(parts.path.strip("/") or 0))
        prefix = f"gwtest:{os.urandom(4).hex()}:"
        with start_gateway(gateway_config(idp, upstream, url, prefix), workers=2) as gw:
            valid = idp.issue("alice")
            expired = expired_session(idp)
            proxy.down()
            ok = httpx.get(f"{gw.url}/x", headers={"Cookie": cookie_header(valid["access"], valid["refresh"])})
            assert ok.status_code == 200
            started = time.monotonic()
            refused = httpx.get(
                f"{gw.url}/x", headers={"Cookie": cookie_header(expired["access"], expired["refresh"])}, timeout=30
            )
            assert refused.status_code == 503 and "set-cookie" not in refused.headers
            assert time.monotonic() - started < 10
            assert httpx.get(f"{gw.url}/.gateway/ready").status_code == 503
            deadline = time.monotonic() + 5  # other workers' numbers reach a scrape within a second
            while metric_value(gw.metrics(), "gateway_store_errors_total", where="refresh") < 1:
                assert time.monotonic() < deadline, "store errors are not counted"
                time.sleep(0.2)
            assert idp.stats()["refresh_calls"] == 0  # never refresh without the lock


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_slow_idp_longer_than_the_lease_is_called_once(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """Regression for oauth2-proxy PR #3456: a lock lease shorter than the IdP call must be renewed."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    config = gateway_config(idp, upstream, redis_url, prefix, timeout=20, lock_lease=5, wait_timeout=30)
    with start_gateway(with_mode(config, mode), workers=4) as gw:
        tab = Browser(gw, mode, redis_url).start(expired_session(idp))
        idp.behaviour(latency=12)
        responses = asyncio.run(storm(f"{gw.url}/slow", tab.cookie, 40))
        assert [r.status_code for r in responses] == [200] * 40
        assert idp.stats()["refresh_calls"] == 1
        assert len(handed_out(responses, tab)) == 1


def _kill_the_owner_mid_call(
    gw: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str, cookie: str
) -> list[Any]:
    """SIGKILL the worker holding the refresh lock once its request reached the IdP; then 10 more requests."""

    async def scenario() -> list[httpx.Response | BaseException]:
        async with httpx.AsyncClient(timeout=40) as client:
            first = asyncio.ensure_future(client.get(f"{gw.url}/a", headers={"Cookie": cookie}))
            owner = await _lock_owner(redis_url, prefix)
            deadline = time.monotonic() + 10
            while refresh_calls(idp) == 0:  # the request is at the IdP, which will redeem it
                assert time.monotonic() < deadline, "the owner never called the IdP"
                await asyncio.sleep(0.02)
            os.kill(owner, signal.SIGKILL)
            others = await asyncio.gather(
                *(client.get(f"{gw.url}/b", headers={"Cookie": cookie}) for _ in range(10)), return_exceptions=True
            )
            killed = await asyncio.gather(first, return_exceptions=True)
            assert isinstance(killed[0], httpx.HTTPError)  # the killed worker's own client lost its connection
            return list(others)

    return asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_worker_killed_mid_call_ends_the_session_cleanly_and_never_resends_the_token(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """The IdP redeemed the token and the only worker that could know the successor died: refresh_lost, not reuse."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    config = gateway_config(idp, upstream, redis_url, prefix, timeout=4, lock_lease=1, wait_timeout=20)
    with start_gateway(with_mode(config, mode), workers=2) as gw:
        tab = Browser(gw, mode, redis_url).start(expired_session(idp))
        idp.behaviour(latency=2)
        others = _kill_the_owner_mid_call(gw, idp, redis_url, prefix, tab.cookie)
        assert all(isinstance(r, httpx.Response) for r in others), others
        for response in others:
            assert response.status_code == 401 and response.json()["reason"] == "refresh_lost"
            assert cleared(response, mode)
        # A negative check: time for a resend to reach the IdP, were there one; cannot fail a right gateway.
        time.sleep(0.5)
        assert refresh_calls(idp) == 1  # never sent again
        assert [e["event"] for e in idp.ledger()] == ["redeemed"]  # no reuse at the IdP: its family lives on
        assert "event=refresh_lost" in gw.log()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_worker_killed_mid_call_is_retried_once_within_the_idps_reuse_window(
    upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """Design point 7: with refresh.idp_reuse_window, the lost answer is asked for again and the session lives."""
    with start_idp(secret=IDP_SECRET, reuse_window=30) as idp:
        prefix = f"gwtest:{os.urandom(4).hex()}:"
        config = gateway_config(
            idp, upstream, redis_url, prefix, timeout=4, lock_lease=1, wait_timeout=20, idp_reuse_window=30
        )
        with start_gateway(with_mode(config, mode), workers=2) as gw:
            tab = Browser(gw, mode, redis_url).start(expired_session(idp))
            idp.behaviour(latency=2)
            others = _kill_the_owner_mid_call(gw, idp, redis_url, prefix, tab.cookie)
            assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in others), others
            assert len(handed_out([r for r in others if isinstance(r, httpx.Response)], tab)) == 1
            assert [e["event"] for e in idp.ledger()] == ["redeemed", "reused_in_window"]
            assert refresh_calls(idp) == 2 and not any(f["revoked"] for f in idp.families())


async def _lock_owner(redis_url: str, prefix: str) -> int:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            async for key in client.scan_iter(match=f"{prefix}lock:*"):
                value = await client.get(key)
                if value:
                    return int(value.split(b":")[0])
            await asyncio.sleep(0.02)
        raise AssertionError("no worker took the refresh lock")
    finally:
        await client.aclose()


def test_simplejwt_style_rotation_with_blacklisting(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> None:
    """Django SimpleJWT with ROTATE_REFRESH_TOKENS + BLACKLIST_AFTER_ROTATION: JSON refresh, 401 on reuse."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    config = gateway_config(idp, upstream, redis_url, prefix, grace_period=2)
    config["refresh"] = {
        "endpoint": f"{idp.url}/api/token/refresh/",
        "style": "json",
        "grace_period": 2,
        "lock_lease": 2,
    }
    config["cookies"] = {"secure": False, "access": {"name": "sid"}, "refresh": {"name": "rid", "max_age": 3600}}
    with start_gateway(config, workers=2) as gw:
        session = expired_session(idp, "bob")
        cookie = f"sid={session['access']}; rid={refresh_cookie(session['refresh'], 'rid')}"
        responses = asyncio.run(storm(f"{gw.url}/x", cookie, 100))
        assert [r.status_code for r in responses] == [200] * 100
        assert idp.stats()["refresh_calls"] == 1
        rotated = {set_cookies(r)["rid"].value for r in responses}
        assert len(rotated) == 1 and rotated != {session["refresh"]}
        assert int(set_cookies(responses[0])["rid"]["max-age"]) <= 3600
        reload = httpx.get(f"{gw.url}/x", headers={"Cookie": cookie})
        assert reload.status_code == 200 and set_cookies(reload)["rid"].value in rotated
        time.sleep(2.5)  # past the 2 s grace period: the old refresh token is a replay now
        late = httpx.get(f"{gw.url}/x", headers={"Cookie": cookie})
        assert late.status_code == 401 and late.json()["reason"] == "reuse"
        assert idp.stats()["refresh_calls"] == 1
