"""Server-side sessions against real processes: `gateway serve --workers 4` with `session.mode: server`,
redis-server, the rotating IdP. The refresh suite's key scenarios (tests/integration/test_refresh_process.py),
in session mode: the browser holds one session cookie, and no response ever sets a token in a cookie.

Sessions start through the capture route (a SimpleJWT-style login at the IdP), or, for tokens taken straight from
the IdP, written into the store with the gateway's own code (support.sessions, support.sessionmodes).

The fault tests whose body is the same in both modes run in both, parametrized over ``mode``
(tests/integration/test_continuity_process.py, test_refresh_process.py, test_failover_process.py); this module
has the rest, and the twins of those whose cookie-mode body does not carry over (a stale record standing for an
old cookie).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from support.faultproxy import FaultProxy
from support.servers import GatewayProcess, IdPProcess, ServerProcess, set_cookies, start_gateway, start_idp
from support.sessionmodes import Browser, cleared
from support.sessions import record_key, start_session
from support.workers import WorkerClients
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from gateway.store import lua

IDP_SECRET = "session-tests-hs256-secret-0123456789abcdef"
SESSION = "__Host-gw_session"
TOKEN_COOKIES = ("__Host-gw_access", "__Host-gw_refresh")
ORIGIN = "https://app.test"


def gateway_config(
    idp: IdPProcess, upstream: ServerProcess, store_url: str, prefix: str, session: dict[str, Any], **refresh: Any
) -> dict[str, Any]:
    return {
        "server": {"trusted_proxies": []},
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
        "session": {"mode": "server", **session},
        "login": {"url": "https://login.test/?next={next}"},
        "routes": [
            {"name": "login", "path": "/api/token/", "upstream": idp.url, "auth": "none", "capture": {}},
            {"name": "app", "path": "/", "upstream": upstream.url},
        ],
    }


# idle_timeout 16: a use is recorded (and the workers' cached copies refreshed) every 2 s.
SESSION_SETTINGS = {"idle_timeout": 16}


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"gwtest:{os.urandom(4).hex()}:"


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str, prefix: str) -> Iterator[GatewayProcess]:
    config = gateway_config(idp, upstream, redis_url, prefix, SESSION_SETTINGS, grace_period=3, lock_lease=2)
    with start_gateway(config, workers=4) as server:
        yield server


@pytest.fixture(autouse=True)
def healthy_idp(idp: IdPProcess) -> Iterator[None]:
    idp.reset()
    yield
    idp.reset()


def no_token_cookie(response: httpx.Response) -> httpx.Response:
    """The promise of session mode: whatever the answer, the only cookie the gateway sets is the session's."""
    names = set(set_cookies(response))
    assert names <= {SESSION}, f"a token cookie was set: {names}"
    return response


def session_of(redis_url: str, prefix: str, tokens: dict[str, str], **settings: Any) -> dict[str, str]:
    cookie = start_session(redis_url, prefix, tokens, {"sub": "alice"}, session=settings or SESSION_SETTINGS)
    return {"Cookie": cookie}


def refresh_calls(idp: IdPProcess) -> int:
    return idp.stats()["refresh_calls"]


async def storm(url: str, headers: dict[str, str], count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(*(client.get(url, headers=headers) for _ in range(count)))


def identity(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.json()["headers"]}


def test_a_captured_login_gives_the_browser_one_session_cookie_and_no_token(gateway: GatewayProcess) -> None:
    login = no_token_cookie(httpx.post(f"{gateway.url}/api/token/", json={"username": "alice", "password": "alice"}))
    assert login.status_code == 200
    morsel = set_cookies(login)[SESSION]
    assert morsel["httponly"] and morsel["secure"] and morsel["path"] == "/" and morsel["samesite"] == "Lax"
    assert "refresh" not in login.json()
    page = no_token_cookie(httpx.get(f"{gateway.url}/page", headers={"Cookie": f"{SESSION}={morsel.value}"}))
    assert page.status_code == 200 and identity(page)["x-auth-user"] == "alice"
    assert "set-cookie" not in page.headers
    assert all(SESSION not in value for name, value in page.json()["headers"] if name == "cookie")  # never upstream


def test_500_concurrent_requests_on_one_expired_session_make_one_idp_call(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str
) -> None:
    headers = session_of(redis_url, prefix, idp.issue("alice", access_ttl=-60))
    before = refresh_calls(idp)
    responses = asyncio.run(storm(f"{gateway.url}/storm", headers, 500))
    assert [r.status_code for r in responses] == [200] * 500
    assert refresh_calls(idp) - before == 1
    assert all("set-cookie" not in r.headers for r in responses)  # nothing for the browser to change
    assert {identity(r)["x-auth-user"] for r in responses} == {"alice"}
    # The successor lives in the record: the next requests need no IdP call, on any worker.
    later = asyncio.run(storm(f"{gateway.url}/next", headers, 40))
    assert [r.status_code for r in later] == [200] * 40 and refresh_calls(idp) - before == 1


def test_an_old_record_within_grace_gets_the_successor_and_after_grace_is_reuse(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str
) -> None:
    headers = session_of(redis_url, prefix, idp.issue("alice", access_ttl=-60))
    key = record_key(prefix, headers["Cookie"])
    client = redis.Redis.from_url(redis_url)
    old = client.get(key)
    assert old is not None
    assert no_token_cookie(httpx.get(f"{gateway.url}/a", headers=headers)).status_code == 200
    before = refresh_calls(idp)
    client.set(key, old, px=60_000)  # the state before the rotation comes back (a restored copy, a stale write)
    for _ in range(8):
        assert no_token_cookie(httpx.get(f"{gateway.url}/b", headers=headers)).status_code == 200
    assert refresh_calls(idp) == before  # within grace: the successor, no IdP call
    time.sleep(3.5)  # grace_period is 3 s here; the workers' cached copies are older than 2 s
    client.set(key, old, px=60_000)
    revocations = idp.stats()["revocations"]
    late = no_token_cookie(httpx.get(f"{gateway.url}/c", headers={**headers, "Accept": "text/html"}))
    assert late.status_code == 302 and late.headers["location"].startswith("https://login.test/")
    assert set_cookies(late)[SESSION]["max-age"] == "0"
    assert refresh_calls(idp) == before  # the reused token never reached the IdP
    deadline = time.monotonic() + 5
    while idp.stats()["revocations"] == revocations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert idp.stats()["revocations"] == revocations + 1  # the family's newest token revoked (RFC 7009)
    after = [httpx.get(f"{gateway.url}/d", headers=headers) for _ in range(8)]
    assert [r.status_code for r in after] == [401] * 8
    client.close()


def test_idp_503_keeps_the_session(gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str) -> None:
    headers = session_of(redis_url, prefix, idp.issue("alice", access_ttl=-60))
    idp.behaviour(fail="503", fail_count=1)
    down = no_token_cookie(httpx.get(f"{gateway.url}/x", headers=headers))
    assert down.status_code == 503 and down.headers["retry-after"] and "set-cookie" not in down.headers
    time.sleep(2.2)  # the failure is shared with concurrent requests for 2 s, then retried
    up = no_token_cookie(httpx.get(f"{gateway.url}/x", headers=headers))
    assert up.status_code == 200 and "set-cookie" not in up.headers
    assert max(idp.redemption_counts().values()) == 1


def test_a_10_kb_access_token_works(gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str) -> None:
    """Far over the 4 KB a cookie may hold: in session mode the token never goes to the browser."""
    tokens = idp.issue("alice", access_ttl=-60, claims={"pad": "x" * 10_000})
    assert len(tokens["access"]) > 10_000
    headers = session_of(redis_url, prefix, tokens)
    first = no_token_cookie(httpx.get(f"{gateway.url}/big", headers=headers))
    assert first.status_code == 200 and identity(first)["x-auth-user"] == "alice"
    assert refresh_calls(idp) == 1  # refreshed to another 10 KB token, kept in the store
    again = no_token_cookie(httpx.get(f"{gateway.url}/big", headers=headers))
    assert again.status_code == 200 and refresh_calls(idp) == 1


def test_logout_ends_the_session_on_every_worker(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str
) -> None:
    headers = session_of(redis_url, prefix, idp.issue("alice"))
    warm = asyncio.run(storm(f"{gateway.url}/warm", headers, 40))  # every worker has the session cached
    assert [r.status_code for r in warm] == [200] * 40
    out = no_token_cookie(httpx.post(f"{gateway.url}/.gateway/logout", headers={**headers, "Origin": gateway.url}))
    assert out.status_code == 204 and set_cookies(out)[SESSION]["max-age"] == "0"
    assert idp.stats()["revocations"] == 1
    time.sleep(1.0)  # other workers learn it through the denylist within a second
    after = asyncio.run(storm(f"{gateway.url}/after", headers, 40))
    assert [r.status_code for r in after] == [401] * 40
    assert all(no_token_cookie(r) and set_cookies(r)[SESSION]["max-age"] == "0" for r in after)


def test_a_cross_site_logout_is_refused(gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str) -> None:
    headers = session_of(redis_url, prefix, idp.issue("alice"))
    forged = httpx.post(f"{gateway.url}/.gateway/logout", headers={**headers, "Origin": "https://evil.test"})
    assert forged.status_code == 403
    unsafe = httpx.post(f"{gateway.url}/x", headers={**headers, "Origin": "https://evil.test"})
    assert unsafe.status_code == 403  # the session cookie is a credential: CSRF applies
    assert httpx.get(f"{gateway.url}/x", headers=headers).status_code == 200


def test_idle_and_absolute_expiry(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> None:
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    settings = {"idle_timeout": 2, "absolute_timeout": 5}
    with start_gateway(gateway_config(idp, upstream, redis_url, prefix, settings), workers=2) as gw:
        idle = session_of(redis_url, prefix, idp.issue("alice"), **settings)
        assert httpx.get(f"{gw.url}/x", headers=idle).status_code == 200
        time.sleep(2.5)  # unused longer than idle_timeout
        ended = no_token_cookie(httpx.get(f"{gw.url}/x", headers=idle))
        assert ended.status_code == 401 and ended.json()["reason"] == "session_ended"
        assert set_cookies(ended)[SESSION]["max-age"] == "0"

        used = session_of(redis_url, prefix, idp.issue("alice"), **settings)
        started = time.monotonic()
        while time.monotonic() - started < 4.5:  # used all along: the idle timeout never strikes
            assert httpx.get(f"{gw.url}/x", headers=used).status_code == 200
            time.sleep(0.2)
        time.sleep(max(0.0, 5.3 - (time.monotonic() - started)))
        late = no_token_cookie(httpx.get(f"{gw.url}/x", headers=used))
        assert late.status_code == 401 and late.json()["reason"] == "session_ended"


def test_redis_down_is_503_not_logout(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> None:
    parts = urlsplit(redis_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        url = proxy.redis_url(int(parts.path.strip("/") or 0))
        prefix = f"gwtest:{os.urandom(4).hex()}:"
        with start_gateway(gateway_config(idp, upstream, url, prefix, SESSION_SETTINGS), workers=2) as gw:
            headers = session_of(redis_url, prefix, idp.issue("alice", access_ttl=-60))
            proxy.down()
            started = time.monotonic()
            refused = no_token_cookie(httpx.get(f"{gw.url}/x", headers=headers, timeout=30))
            assert refused.status_code == 503 and "set-cookie" not in refused.headers
            assert time.monotonic() - started < 10
            assert refresh_calls(idp) == 0  # never refresh without the lock
            proxy.heal()
            deadline = time.monotonic() + 10
            while (back := httpx.get(f"{gw.url}/x", headers=headers, timeout=30)).status_code == 503:
                assert time.monotonic() < deadline, "the session did not come back with the store"
                time.sleep(0.3)
            assert no_token_cookie(back).status_code == 200 and refresh_calls(idp) == 1


def test_an_oidc_login_starts_a_server_side_session(upstream: ServerProcess, redis_url: str) -> None:
    """The gateway's own OIDC login (code + PKCE) in session mode: the callback sets the session cookie alone."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with start_idp(algorithm="RS256") as oidc_idp:

        def config(port: int) -> dict[str, Any]:
            return {
                "store": {"url": redis_url, "key_prefix": prefix, "secret": "store-secret-for-tests"},
                "tokens": {"algorithms": ["RS256"], "jwks_url": f"{oidc_idp.url}/jwks", "audience": "legacy-app"},
                "refresh": {
                    "endpoint": f"{oidc_idp.url}/token",
                    "client_id": "legacy-app",
                    "client_secret": "demo-secret",
                },
                "cookies": {"secure": False},
                "session": {"mode": "server"},
                "login": {
                    "oidc": {
                        "issuer": oidc_idp.url,
                        "client_id": "legacy-app",
                        "client_secret": "demo-secret",
                        "redirect_url": f"http://127.0.0.1:{port}/.gateway/callback",
                    }
                },
                "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
            }

        with start_gateway(config, workers=2) as gw:
            first = httpx.get(f"{gw.url}/reports", headers={"Accept": "text/html"})
            to_idp = httpx.get(f"{gw.url}{first.headers['location']}")
            state = set_cookies(to_idp)["gw_oidc"].value
            done = httpx.get(
                oidc_idp.sign_in(to_idp.headers["location"], "bob"), headers={"Cookie": f"gw_oidc={state}"}
            )
            assert done.status_code == 302 and done.headers["location"] == "/reports"
            assert set(set_cookies(done)) == {"gw_session", "gw_oidc"}  # the login state cleared, and the session
            session = set_cookies(done)["gw_session"].value
            page = httpx.get(f"{gw.url}/reports", headers={"Cookie": f"gw_session={session}"})
            assert page.status_code == 200 and identity(page)["x-auth-user"] == "bob"
            assert "set-cookie" not in page.headers


def test_logout_closes_the_sessions_websockets(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str
) -> None:
    headers = session_of(redis_url, prefix, idp.issue("alice"))
    url = gateway.url.replace("http://", "ws://") + "/live"
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(connect(url, additional_headers={**headers, "Origin": gateway.url}, open_timeout=10))
            for _ in range(6)  # spread over the workers
        ]
        for ws in sockets:
            assert json.loads(ws.recv(timeout=5))["hello"]
        with pytest.raises(InvalidStatus):  # a cross-site handshake riding on the session cookie
            connect(url, additional_headers={**headers, "Origin": "https://evil.test"}, open_timeout=10)
        out = httpx.post(f"{gateway.url}/.gateway/logout", headers={**headers, "Origin": gateway.url})
        assert out.status_code == 204
        for ws in sockets:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


# --- the fault tests (tests/integration/test_continuity_process.py) in session mode ---------------------------


@pytest.fixture
def proxy(redis_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(redis_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy


def serve(idp: IdPProcess, upstream: ServerProcess, store_url: str, prefix: str, **refresh: Any) -> GatewayProcess:
    config = gateway_config(
        idp, upstream, store_url, prefix, SESSION_SETTINGS, **({"lock_lease": 1, "grace_period": 3} | refresh)
    )
    return start_gateway(config, workers=2)


async def at_the_idp(idp: IdPProcess) -> None:
    deadline = time.monotonic() + 10
    while (await asyncio.to_thread(idp.stats))["refresh_calls"] < 1:
        assert time.monotonic() < deadline, "no refresh reached the IdP"
        await asyncio.sleep(0.02)


def test_a_logout_during_a_refresh_is_not_undone(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> None:
    """Failure 4 in session mode: the refresh's write-back must not bring a logged-out session back."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with serve(idp, upstream, redis_url, prefix, revocation_endpoint=None) as gw:
        headers = session_of(redis_url, prefix, idp.issue("alice", access_ttl=-60))
        idp.behaviour(latency=1.0)

        async def race() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                refreshing = asyncio.ensure_future(client.get(f"{gw.url}/x", headers=headers))
                await at_the_idp(idp)  # the refresh is under way (the IdP answers after 1 s)
                logout = await client.post(f"{gw.url}/.gateway/logout", headers={**headers, "Origin": gw.url})
                return await refreshing, logout

        refreshed, logout = asyncio.run(race())
        assert no_token_cookie(logout).status_code == 204
        assert no_token_cookie(refreshed).status_code == 401
        assert refreshed.json()["reason"] == "session_ended" and set_cookies(refreshed)[SESSION]["max-age"] == "0"
        assert redis.Redis.from_url(redis_url).get(record_key(prefix, headers["Cookie"])) is None
        again = no_token_cookie(httpx.get(f"{gw.url}/x", headers=headers))
        assert again.status_code == 401 and again.json()["reason"] == "session_ended"
        assert [e["event"] for e in idp.ledger()] == ["redeemed"]


def test_redis_down_during_the_idp_call_the_successor_is_written_back_when_it_is_back(
    idp: IdPProcess, upstream: ServerProcess, proxy: FaultProxy, redis_url: str
) -> None:
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with serve(idp, upstream, proxy.redis_url(int(urlsplit(redis_url).path.strip("/") or 0)), prefix) as gw:
        headers = session_of(redis_url, prefix, idp.issue("alice", access_ttl=-60))
        idp.behaviour(latency=1.0)

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(timeout=30) as client:
                owner = asyncio.ensure_future(client.get(f"{gw.url}/a", headers=headers))
                await at_the_idp(idp)  # the owner's call is in flight (the IdP answers after 1 s)
                await asyncio.to_thread(proxy.down)
                await asyncio.sleep(2.0)  # Redis is down for 2 s: longer than the IdP call
                await asyncio.to_thread(proxy.heal)
                return await owner

        first = no_token_cookie(asyncio.run(scenario()))
        assert first.status_code == 200
        later = [no_token_cookie(httpx.get(f"{gw.url}/b", headers=headers, timeout=30)) for _ in range(6)]
        assert [r.status_code for r in later] == [200] * 6
        assert idp.stats()["refresh_calls"] == 1
        assert max(idp.redemption_counts().values()) == 1


def test_reuse_of_an_old_record_ends_the_newest_tokens_too_with_an_idp_that_ignores_revocation(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> None:
    """Failure 3 in session mode: R0 -> R1, then a stale copy of the record (a restored backup, a lost write)
    presents R0 past grace. The whole session ends, its live access token too, on every worker, though the IdP
    (SimpleJWT: no revocation) would still honour R1 and the gateway does not even tell it."""
    idp.behaviour(revoke_used=False, reuse_revokes_family=False)
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with serve(idp, upstream, redis_url, prefix, grace_period=1, revocation_endpoint=None) as gw:
        tab = Browser(gw, "server", redis_url).start(idp.issue("alice", access_ttl=-60))
        key = record_key(prefix, tab.cookie)
        client = redis.Redis.from_url(redis_url)
        r0 = client.get(key)
        assert tab.get().status_code == 200
        newest = tab.record()
        assert newest is not None and newest.refresh != tab.first_refresh
        time.sleep(2.2)  # past the 1 s grace period, and past the workers' cached copies (2 s)
        client.set(key, r0 or b"", px=60_000)
        thief = tab.copy().get()
        assert thief.status_code == 401 and thief.json()["reason"] == "reuse" and cleared(thief, "server")
        owner = tab.get()  # the browser itself: over too
        assert owner.status_code == 401 and cleared(owner, "server")
        with WorkerClients(gw) as workers:  # the newest access token: refused on every worker within a second
            deadline = time.monotonic() + 3
            while True:
                served = workers.batch([("GET", f"{gw.url}/x", {"Authorization": f"Bearer {newest.access}"})] * 8)
                if {s.worker for s in served} == set(workers.pids) and all(
                    s.response.status_code != 200 for s in served
                ):
                    break
                assert time.monotonic() < deadline, "the session's live access token still works on some worker"
                time.sleep(0.1)
        assert all(s.response.json()["reason"] == "token_revoked" for s in served)
        assert refresh_calls(idp) == 1  # the replay never reached the IdP
        assert max(idp.redemption_counts().values()) == 1
        at_idp = httpx.post(f"{idp.url}/token", data={"grant_type": "refresh_token", "refresh_token": newest.refresh},
                            auth=("legacy-app", "demo-secret"))  # fmt: skip
        assert at_idp.status_code == 200  # only the gateway stands between the replayed session and the app
        client.close()


def test_a_superseded_record_after_a_logout_is_401_with_the_session_cookie_cleared(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> None:
    """Failure 10 in session mode: the record as it was before a refresh comes back after the logout, within
    grace: its grace hit must not hand back the denylisted successor."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with serve(idp, upstream, redis_url, prefix, grace_period=30) as gw:
        tab = Browser(gw, "server", redis_url).start(idp.issue("alice", access_ttl=-60))
        key = record_key(prefix, tab.cookie)
        client = redis.Redis.from_url(redis_url)
        old = client.get(key)
        assert tab.get().status_code == 200
        out = httpx.post(f"{gw.url}/.gateway/logout", headers=tab.headers(Origin=gw.url))
        assert out.status_code == 204
        client.set(key, old or b"", px=60_000)
        other_tab = no_token_cookie(httpx.get(f"{gw.url}/x", headers=tab.headers()))
        assert other_tab.status_code == 401 and other_tab.json()["reason"] == "session_ended"
        assert cleared(other_tab, "server") and refresh_calls(idp) == 1
        client.close()


def test_a_session_record_copied_to_another_sessions_key_does_not_unseal(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str
) -> None:
    """Failure 8 (I4) for session records: someone with write access to Redis, not the secret, gives Bob
    Alice's record."""
    alice = Browser(gateway, "server", redis_url).start(idp.issue("alice"), {"sub": "alice"})
    bob = Browser(gateway, "server", redis_url).start(idp.issue("bob"), {"sub": "bob"})
    with redis.Redis.from_url(redis_url) as client:
        client.set(record_key(prefix, bob.cookie), client.get(record_key(prefix, alice.cookie)) or b"", px=60_000)
    response = bob.get()
    assert response.status_code == 401 and "alice" not in response.text and cleared(response, "server")
    assert alice.get().status_code == 200 and identity(alice.get())["x-auth-user"] == "alice"


def test_a_key_dropped_by_the_idp_does_not_strand_an_idle_session(upstream: ServerProcess, redis_url: str) -> None:
    """The IdP rolled its keys over and dropped the old one from its JWKS while the session sat idle: the record's
    expired access token names a kid nobody knows any more. It is refreshed (the new token verifies), not refused
    until the idle timeout (cookie mode clears such an access cookie and refreshes)."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with start_idp(algorithm="RS256") as rs_idp:
        config = gateway_config(rs_idp, upstream, redis_url, prefix, SESSION_SETTINGS)
        config["tokens"] = {"algorithms": ["RS256"], "jwks_url": f"{rs_idp.url}/jwks", "audience": "legacy-app"}
        with start_gateway(config, workers=1) as gw:
            tab = Browser(gw, "server", redis_url).start(rs_idp.issue("alice", access_ttl=-60))
            rs_idp.rotate_key(drop_old=True)
            time.sleep(5.2)  # the gateway refetches a JWKS at most every 5 s
            newcomer = rs_idp.issue("bob")["access"]  # its new kid makes the gateway refetch: the old kid is gone
            assert httpx.get(f"{gw.url}/x", headers={"Authorization": f"Bearer {newcomer}"}).status_code == 200
            back = tab.get()
            assert back.status_code == 200, back.text
            assert rs_idp.stats()["refresh_calls"] == 1 and max(rs_idp.redemption_counts().values()) == 1


def test_only_the_session_cookie_refreshes_and_an_expired_bearer_never_does(
    gateway: GatewayProcess, idp: IdPProcess, redis_url: str, prefix: str
) -> None:
    """test_refresh_process's test_only_valid_expired_cookie_sessions_refresh in session mode: an API client's
    expired Bearer token is 401 even with a session cookie alongside, a session cookie the gateway did not seal
    is never looked up, and the session cookie alone resumes the session."""
    session = idp.issue("alice", access_ttl=-60)
    tab = Browser(gateway, "server", redis_url).start(session)
    before = refresh_calls(idp)
    api = tab.headers(Authorization=f"Bearer {session['access']}")
    bearer = no_token_cookie(httpx.get(f"{gateway.url}/x", headers=api))
    assert bearer.status_code == 401 and bearer.json()["reason"] == "token_expired"
    forged = no_token_cookie(httpx.get(f"{gateway.url}/x", headers={"Cookie": f"{SESSION}=not-sealed-here"}))
    assert forged.status_code == 401 and set_cookies(forged)[SESSION]["max-age"] == "0"
    assert refresh_calls(idp) == before
    resumed = tab.get()
    assert resumed.status_code == 200 and refresh_calls(idp) == before + 1


def test_simplejwt_style_rotation_with_blacklisting(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> None:
    """test_refresh_process's SimpleJWT test in session mode: JSON refresh, one call for a storm, reuse after grace."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    config = gateway_config(idp, upstream, redis_url, prefix, SESSION_SETTINGS)
    endpoint = f"{idp.url}/api/token/refresh/"
    config["refresh"] = {"endpoint": endpoint, "style": "json", "grace_period": 2, "lock_lease": 2}
    with start_gateway(config, workers=2) as gw:
        tab = Browser(gw, "server", redis_url).start(idp.issue("bob", access_ttl=-60), {"sub": "bob"})
        key = record_key(prefix, tab.cookie)
        client = redis.Redis.from_url(redis_url)
        old = client.get(key)
        responses = asyncio.run(storm(f"{gw.url}/x", tab.headers(), 100))
        assert [no_token_cookie(r).status_code for r in responses] == [200] * 100
        assert refresh_calls(idp) == 1 and {identity(r)["x-auth-user"] for r in responses} == {"bob"}
        assert tab.refresh_token() not in (None, tab.first_refresh)
        time.sleep(2.5)  # past the 2 s grace period (and the workers' cached copies): the old record is a replay
        client.set(key, old or b"", px=60_000)
        late = tab.get()
        assert late.status_code == 401 and late.json()["reason"] == "reuse" and cleared(late, "server")
        assert refresh_calls(idp) == 1
        client.close()


@pytest.mark.parametrize("fault", ["drop_reply", "reset_before"])
def test_a_write_back_whose_reply_is_lost_or_that_never_landed_costs_nothing(
    idp: IdPProcess, upstream: ServerProcess, proxy: FaultProxy, redis_url: str, fault: str
) -> None:
    """Session mode's own step, under failure 1's faults: the compare-and-set that writes the successor into the
    record loses its reply (it happened) or fails before Redis saw it (retried in the background). The request
    gets its page either way, and the next ones find the successor: no second IdP call, no token sent twice."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    with serve(idp, upstream, proxy.redis_url(int(urlsplit(redis_url).path.strip("/") or 0)), prefix) as gw:
        tab = Browser(gw, "server", redis_url).start(idp.issue("alice", access_ttl=-60))
        # A reset is retried once by redis-py: two make the write fail. A lost reply is a 2 s timeout, not retried.
        times = 2 if fault == "reset_before" else 1
        rule = proxy.add_rule(f"^EVALSHA {hashlib.sha1(lua.REPLACE.encode()).hexdigest()}", fault, times=times)
        first = tab.get()
        assert first.status_code == 200 and proxy.matched(rule) >= 1
        deadline = time.monotonic() + 5  # the background write-back lands within a retry pause or two
        while tab.refresh_token() == tab.first_refresh:
            assert time.monotonic() < deadline, "the successor never reached the record"
            time.sleep(0.1)
        later = [tab.get() for _ in range(8)]
        assert [r.status_code for r in later] == [200] * 8 and all("set-cookie" not in r.headers for r in later)
        assert refresh_calls(idp) == 1 and max(idp.redemption_counts().values()) == 1
