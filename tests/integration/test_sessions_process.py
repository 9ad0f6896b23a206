"""Browser sessions against real processes: `gateway serve --workers 4`, redis-server, the demo IdP, upstreams.

Token capture, logout (revocation + denylist across workers), CSRF, revoke_superseded, 401 vs
redirect, and cookie hygiene. Every test starts its own session at the IdP; counters are deltas.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from support.ports import refused_port
from support.sealed import refresh_cookie
from support.servers import (
    GatewayProcess,
    IdPProcess,
    ServerProcess,
    set_cookies,
    start_gateway,
    start_idp,
)
from support.waiting import wait_until
from support.workers import Request, WorkerClients

IDP_SECRET = "sessions-tests-hs256-secret-0123456789abcdef"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"
LOGIN_URL = "https://login.test/?next={next}"
EVIL = "https://evil.example"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
WEBDAV = ["PROPPATCH", "MOVE", "PURGE", "QUERY"]  # unsafe too, though no browser form sends them


class CountingUpstream:
    """A tiny upstream in this process that counts the requests it gets (to prove the gateway did not call it)."""

    def __init__(self) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.hits += 1
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                body = json.dumps({"ok": True, "method": self.command}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CountingUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def gateway_config(
    idp: IdPProcess,
    upstream: ServerProcess,
    counted: CountingUpstream,
    store_url: str,
    *,
    revocation_endpoint: str,
    keep_access: bool = True,
) -> dict[str, Any]:
    return {
        "store": {"url": store_url, "key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": "store-secret-for-tests"},
        "tokens": {
            "algorithms": ["HS256"],
            "secret": IDP_SECRET,
            "audience": "legacy-app",
            "leeway": 0,
            "refresh_before": 60,
            "revoke_superseded": True,
        },
        "refresh": {
            "endpoint": f"{idp.url}/token",
            "style": "oauth2",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
            "revocation_endpoint": revocation_endpoint,
            "grace_period": 10,
        },
        "cookies": {"secure": True},
        "login": {"url": LOGIN_URL},
        "logout": {"redirect": "/bye"},
        "routes": [
            {
                "name": "login",
                "path": "/api/token/",
                "upstream": idp.url,
                "auth": "none",
                "capture": {"access": "access", "refresh": "refresh", "keep_access": keep_access},
            },
            {"name": "counted", "path": "/counted/", "upstream": counted.url, "methods": [*METHODS, *WEBDAV]},
            {"name": "app", "path": "/", "upstream": upstream.url},
        ],
    }


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def counted() -> Iterator[CountingUpstream]:
    with CountingUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    idp: IdPProcess, upstream: ServerProcess, counted: CountingUpstream, redis_url: str
) -> Iterator[GatewayProcess]:
    config = gateway_config(idp, upstream, counted, redis_url, revocation_endpoint=f"{idp.url}/revoke")
    with start_gateway(config, workers=4) as server:
        yield server


@pytest.fixture(scope="module")
def lonely_gateway(
    idp: IdPProcess, upstream: ServerProcess, counted: CountingUpstream, redis_url: str
) -> Iterator[GatewayProcess]:
    """Its revocation endpoint is down, and its login route keeps no token in the body (keep_access: false)."""
    with refused_port() as port:  # held for the module: the revocation endpoint refuses connections
        dead = f"http://127.0.0.1:{port}/revoke"
        config = gateway_config(idp, upstream, counted, redis_url, revocation_endpoint=dead, keep_access=False)
        with start_gateway(config, workers=2) as server:
            yield server


@pytest.fixture
def every_worker(gateway: GatewayProcess) -> Iterator[WorkerClients]:
    """A connection held by each of the gateway's 4 workers: batches sent over them reach every worker."""
    with WorkerClients(gateway) as clients:
        yield clients


@pytest.fixture
def every_lonely_worker(lonely_gateway: GatewayProcess) -> Iterator[WorkerClients]:
    with WorkerClients(lonely_gateway) as clients:
        yield clients


# --- helpers ------------------------------------------------------------------------------


def cookie_header(access: str | None, refresh: str | None) -> str:
    """The cookies a browser holds: a raw refresh token (from the IdP) goes in sealed, as the gateway set it."""
    sealed = refresh and refresh_cookie(refresh, REFRESH)
    return "; ".join(p for p in (access and f"{ACCESS}={access}", sealed and f"{REFRESH}={sealed}") if p)


def log_in(gateway: GatewayProcess, user: str = "alice") -> tuple[httpx.Response, str, str]:
    """Log in through the captured SimpleJWT endpoint; the response and the (access, refresh) cookie values."""
    response = httpx.post(f"{gateway.url}/api/token/", json={"username": user, "password": user})
    assert response.status_code == 200, response.text
    jar = set_cookies(response)
    return response, jar[ACCESS].value, jar[REFRESH].value


def log_out(gateway: GatewayProcess, cookie: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/.gateway/logout", headers={"Cookie": cookie, "Origin": gateway.url, **headers})


def batch(workers: WorkerClients, requests: list[Request]) -> list[httpx.Response]:
    """The answers to ``requests``, sent so that every worker answers some of them (it is checked)."""
    served = workers.batch(requests)
    assert {s.worker for s in served} == set(workers.pids), "not every worker answered a part of the batch"
    return [s.response for s in served]


def replays(gateway: GatewayProcess, access: str, count: int = 20) -> list[Request]:
    """The access token replayed as Bearer (half) and as the access cookie (half)."""
    bearer = {"Authorization": f"Bearer {access}"}
    cookie = {"Cookie": cookie_header(access, None)}
    return [("GET", f"{gateway.url}/replay/{i}", bearer if i % 2 else cookie) for i in range(count)]


def revoked(response: httpx.Response) -> bool:
    return response.status_code == 401 and response.json()["reason"] == "token_revoked"


def refused_within(workers: WorkerClients, access: str, since: float, limit: float = 1.0) -> float:
    """Seconds after ``since`` until every worker refuses a whole batch of replays as revoked; fails past ``limit``."""
    while True:
        served = workers.batch(replays(workers.gateway, access))
        elapsed = time.monotonic() - since
        if {s.worker for s in served} == set(workers.pids) and all(revoked(s.response) for s in served):
            return elapsed
        assert elapsed < limit, [(s.worker, s.response.status_code, s.response.text[:80]) for s in served]


def stat(idp: IdPProcess, name: str) -> int:
    return idp.stats()[name]


# --- (a) token capture ----------------------------------------------------------------------


def test_login_response_becomes_cookies_and_loses_the_refresh_token(gateway: GatewayProcess, idp: IdPProcess) -> None:
    logins = stat(idp, "logins")
    response, access, refresh = log_in(gateway)
    assert stat(idp, "logins") == logins + 1
    jar = set_cookies(response)
    for name in (ACCESS, REFRESH):
        assert jar[name]["httponly"] and jar[name]["secure"] and jar[name]["path"] == "/"
    body = response.json()
    assert body == {"access": access}
    assert "refresh" not in body and refresh not in response.text
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["cache-control"] == "no-store"
    # The captured cookies are a working session.
    app = httpx.get(f"{gateway.url}/app", headers={"Cookie": cookie_header(access, refresh)})
    assert app.status_code == 200
    assert ["x-auth-user", "alice"] in app.json()["headers"]


def test_failed_login_passes_through_without_cookies(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/api/token/", json={"username": "alice", "password": "wrong"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert response.json()["detail"].startswith("No active account")


def test_keep_access_false_leaves_no_token_in_the_body(lonely_gateway: GatewayProcess) -> None:
    response, access, refresh = log_in(lonely_gateway, "bob")
    assert response.json() == {}
    assert access not in response.text and refresh not in response.text
    assert int(response.headers["content-length"]) == len(response.content)
    app = httpx.get(f"{lonely_gateway.url}/app", headers={"Cookie": cookie_header(access, refresh)})
    assert app.status_code == 200 and ["x-auth-user", "bob"] in app.json()["headers"]


# --- (b) logout -----------------------------------------------------------------------------


def test_logout_revokes_and_every_worker_refuses_the_old_token_within_a_second(
    gateway: GatewayProcess, idp: IdPProcess, every_worker: WorkerClients
) -> None:
    _, access, refresh = log_in(gateway)
    warm = batch(every_worker, replays(gateway, access))  # every worker has verified (and cached) the token
    assert [r.status_code for r in warm] == [200] * 20
    revocations, refreshes = stat(idp, "revocations"), stat(idp, "refresh_calls")

    response = log_out(gateway, cookie_header(access, refresh))
    logged_out = time.monotonic()
    assert response.status_code == 204
    cleared = set_cookies(response)
    assert cleared[ACCESS].value == "" and cleared[ACCESS]["max-age"] == "0"
    assert cleared[REFRESH].value == "" and cleared[REFRESH]["max-age"] == "0"
    assert stat(idp, "revocations") == revocations + 1

    assert refused_within(every_worker, access, logged_out) < 1.0
    again = batch(every_worker, replays(gateway, access))  # and it stays refused
    assert {(r.status_code, r.json()["reason"]) for r in again} == {(401, "token_revoked")}

    # The old refresh cookie no longer refreshes (alone or with the old access cookie), and never reaches the IdP.
    for cookie in [cookie_header(None, refresh), cookie_header(access, refresh)] * 3:
        stale = httpx.get(f"{gateway.url}/app", headers={"Cookie": cookie})
        assert stale.status_code == 401
        assert set_cookies(stale)[REFRESH]["max-age"] == "0"
    page = httpx.get(f"{gateway.url}/app", headers={"Cookie": cookie_header(access, refresh), "Accept": "text/html"})
    assert page.status_code == 302 and page.headers["location"].startswith("https://login.test/")
    assert stat(idp, "refresh_calls") == refreshes


def test_browser_logout_is_redirected(gateway: GatewayProcess, every_worker: WorkerClients) -> None:
    _, access, refresh = log_in(gateway)
    response = httpx.post(
        f"{gateway.url}/.gateway/logout",
        data={"csrf": "x"},  # an HTML form's logout button
        headers={"Cookie": cookie_header(access, refresh), "Origin": gateway.url, "Accept": "text/html"},
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/bye"
    assert set_cookies(response)[REFRESH]["max-age"] == "0"
    assert refused_within(every_worker, access, time.monotonic()) < 1.0


def test_logout_with_revocation_endpoint_down_still_ends_the_session(
    lonely_gateway: GatewayProcess, idp: IdPProcess, every_lonely_worker: WorkerClients
) -> None:
    _, access, refresh = log_in(lonely_gateway)
    refreshes = stat(idp, "refresh_calls")
    response = log_out(lonely_gateway, cookie_header(access, refresh))
    assert response.status_code == 204
    cleared = set_cookies(response)
    assert cleared[ACCESS]["max-age"] == "0" and cleared[REFRESH]["max-age"] == "0"
    assert refused_within(every_lonely_worker, access, time.monotonic()) < 1.0
    stale = httpx.get(f"{lonely_gateway.url}/app", headers={"Cookie": cookie_header(None, refresh)})
    assert stale.status_code == 401
    assert stat(idp, "refresh_calls") == refreshes


def test_cross_site_logout_is_refused_and_the_session_lives(
    gateway: GatewayProcess, idp: IdPProcess, every_worker: WorkerClients
) -> None:
    _, access, refresh = log_in(gateway)
    revocations = stat(idp, "revocations")
    response = log_out(gateway, cookie_header(access, refresh), Origin=EVIL)
    assert response.status_code == 403 and response.json()["reason"] == "csrf"
    assert "set-cookie" not in response.headers
    assert stat(idp, "revocations") == revocations
    # A negative check: a denial, had there been one, reaches every worker within a second (tested above);
    # this gives it the time to, and cannot fail a correct gateway.
    time.sleep(1.0)
    assert [r.status_code for r in batch(every_worker, replays(gateway, access, 8))] == [200] * 8


def test_bearer_logout_denies_the_token(gateway: GatewayProcess, every_worker: WorkerClients) -> None:
    _, access, _ = log_in(gateway)
    response = httpx.post(f"{gateway.url}/.gateway/logout", headers={"Authorization": f"Bearer {access}"})
    assert response.status_code == 204
    assert refused_within(every_worker, access, time.monotonic()) < 1.0


# --- (c) CSRF -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"Origin": EVIL}, {"Sec-Fetch-Site": "cross-site"}, {"Referer": f"{EVIL}/form"}, {"Origin": "null"}],
    ids=["origin", "sec-fetch-site", "referer", "null-origin"],
)
def test_cross_site_cookie_post_is_refused_before_upstream(
    gateway: GatewayProcess, counted: CountingUpstream, headers: dict[str, str]
) -> None:
    _, access, refresh = log_in(gateway)
    hits = counted.hits
    response = httpx.post(
        f"{gateway.url}/counted/transfer",
        data={"amount": "100"},
        headers={"Cookie": cookie_header(access, refresh), **headers},
    )
    assert response.status_code == 403
    assert response.json()["reason"] == "csrf"
    assert counted.hits == hits


def test_same_origin_cookie_post_and_bearer_post_pass(gateway: GatewayProcess, counted: CountingUpstream) -> None:
    _, access, refresh = log_in(gateway)
    hits = counted.hits
    cookie = {"Cookie": cookie_header(access, refresh)}
    same = httpx.post(f"{gateway.url}/counted/a", json={}, headers={**cookie, "Origin": gateway.url})
    assert same.status_code == 200 and same.json() == {"ok": True, "method": "POST"}
    fetch = httpx.put(
        f"{gateway.url}/counted/b", json={}, headers={**cookie, "Origin": gateway.url, "Sec-Fetch-Site": "same-origin"}
    )
    assert fetch.status_code == 200
    curl = httpx.delete(f"{gateway.url}/counted/c", headers=cookie)  # neither Origin nor Referer
    assert curl.status_code == 200
    bearer = httpx.post(
        f"{gateway.url}/counted/d", json={}, headers={"Authorization": f"Bearer {access}", "Origin": EVIL}
    )
    assert bearer.status_code == 200  # a browser never adds Authorization on its own: exempt
    assert counted.hits == hits + 4


@pytest.mark.parametrize("cookies", ["both", "refresh only"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", *WEBDAV])
def test_every_unsafe_method_from_another_site_is_refused_whichever_cookie_rides_along(
    gateway: GatewayProcess, idp: IdPProcess, counted: CountingUpstream, method: str, cookies: str
) -> None:
    # Issue 14 (9 and the CSRF proof): a refresh cookie alone is a session too, and would be refreshed.
    _, access, refresh = log_in(gateway)
    hits, calls = counted.hits, idp.stats()["refresh_calls"]
    cookie = cookie_header(access if cookies == "both" else None, refresh)
    response = httpx.request(method, f"{gateway.url}/counted/x", headers={"Cookie": cookie, "Origin": EVIL})
    assert response.status_code == 403 and response.json()["reason"] == "csrf"
    assert counted.hits == hits and idp.stats()["refresh_calls"] == calls


def test_a_cross_site_post_to_the_login_route_is_refused(gateway: GatewayProcess, idp: IdPProcess) -> None:
    # Login CSRF: the attacker's credentials posted from another site would log the victim into the
    # attacker's account (the captured tokens become the victim's cookies).
    logins = idp.stats().get("logins", 0)
    response = httpx.post(
        f"{gateway.url}/api/token/", json={"username": "mallory", "password": "mallory"}, headers={"Origin": EVIL}
    )
    assert response.status_code == 403 and response.json()["reason"] == "csrf"
    assert "set-cookie" not in response.headers and idp.stats().get("logins", 0) == logins
    same = httpx.post(
        f"{gateway.url}/api/token/", json={"username": "bob", "password": "bob"}, headers={"Origin": gateway.url}
    )
    assert same.status_code == 200


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer a\tb", "Bearer a b", ""])
def test_a_malformed_authorization_is_401_even_beside_a_known_cookie(
    gateway: GatewayProcess, counted: CountingUpstream, authorization: str
) -> None:
    # Issue 14 (8): it used to skip the CSRF check, and the cached cookie then authenticated the request.
    _, access, refresh = log_in(gateway)
    cookie = {"Cookie": cookie_header(access, refresh)}
    for _ in range(3):  # known to every worker's fast path... or at least to some
        assert httpx.get(f"{gateway.url}/counted/warm", headers=cookie).status_code == 200
    hits = counted.hits
    response = httpx.post(
        f"{gateway.url}/counted/x", headers={**cookie, "Authorization": authorization, "Origin": EVIL}
    )
    assert response.status_code in (401, 403) and counted.hits == hits
    if authorization.strip():
        assert (response.status_code, response.json()["reason"]) == (401, "malformed_authorization")


def test_methods_outside_the_route_are_405_and_trace_never_echoes(gateway: GatewayProcess) -> None:
    _, access, refresh = log_in(gateway)
    cookie = {"Cookie": cookie_header(access, refresh)}
    for method in ("TRACE", "CONNECT", "PROPFIND"):
        response = httpx.request(method, f"{gateway.url}/page", headers=cookie)
        assert response.status_code == 405 and response.json()["reason"] == "method_not_allowed"
        assert response.headers["allow"] == ", ".join(METHODS)
        assert access not in response.text


def test_cross_site_get_is_not_refused(gateway: GatewayProcess) -> None:
    _, access, refresh = log_in(gateway)
    headers = {"Cookie": cookie_header(access, refresh), "Origin": EVIL, "Sec-Fetch-Site": "cross-site"}
    assert httpx.get(f"{gateway.url}/page", headers=headers).status_code == 200


# --- (d) tokens.revoke_superseded -------------------------------------------------------------


def test_refresh_revokes_the_superseded_access_token(
    gateway: GatewayProcess, idp: IdPProcess, every_worker: WorkerClients
) -> None:
    # Valid, but inside refresh_before (60 s): issued 100 s ago, so half its lifetime is more than that.
    session = idp.issue("alice", access_ttl=20, claims={"iat": int(time.time()) - 100})
    assert (
        batch(every_worker, replays(gateway, session["access"], 4))[0].status_code == 200
    )  # Bearer is never refreshed
    refreshes = stat(idp, "refresh_calls")
    first = httpx.get(f"{gateway.url}/page", headers={"Cookie": cookie_header(session["access"], session["refresh"])})
    refreshed_at = time.monotonic()
    assert first.status_code == 200
    assert stat(idp, "refresh_calls") == refreshes + 1
    jar = set_cookies(first)
    new_access, new_refresh = jar[ACCESS].value, jar[REFRESH].value
    assert new_access != session["access"] and new_refresh != session["refresh"]

    assert refused_within(every_worker, session["access"], refreshed_at) < 1.0
    fresh = batch(
        every_worker, [("GET", f"{gateway.url}/n/{i}", {"Authorization": f"Bearer {new_access}"}) for i in range(20)]
    )
    assert [r.status_code for r in fresh] == [200] * 20
    assert stat(idp, "refresh_calls") == refreshes + 1


def test_old_cookies_within_grace_still_get_the_successor(
    gateway: GatewayProcess, idp: IdPProcess, every_worker: WorkerClients
) -> None:
    """Regression: with revoke_superseded, a racing tab still holding the old cookies must not be logged out."""
    session = idp.issue("alice", access_ttl=20, claims={"iat": int(time.time()) - 100})  # due for refresh
    old = {"Cookie": cookie_header(session["access"], session["refresh"])}
    first = httpx.get(f"{gateway.url}/page", headers=old)
    assert first.status_code == 200
    successor = set_cookies(first)[REFRESH].value
    refreshes = stat(idp, "refresh_calls")
    bearer = {"Authorization": f"Bearer {session['access']}"}
    wait_until(  # the old access token is on every worker's denylist now
        lambda: all(revoked(r) for r in batch(every_worker, [("GET", f"{gateway.url}/probe", bearer)] * 8)),
        "every worker refuses the superseded access token",
    )
    late = batch(every_worker, [("GET", f"{gateway.url}/late/{i}", old) for i in range(8)])
    assert [r.status_code for r in late] == [200] * 8
    assert {set_cookies(r)[REFRESH].value for r in late} == {successor}
    assert stat(idp, "refresh_calls") == refreshes


# --- (e) 401 vs redirect ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Mode": "cors", "Accept": "text/html"},
        {"X-Requested-With": "XMLHttpRequest", "Accept": "text/html"},
        {"Accept": "application/json"},
        {},
    ],
    ids=["fetch", "xhr", "json", "curl"],
)
def test_scripts_get_401_json_with_login_url(gateway: GatewayProcess, headers: dict[str, str]) -> None:
    response = httpx.get(f"{gateway.url}/app/page?x=1", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    body = response.json()
    assert body["reason"] == "no_token"
    assert body["login_url"] == "https://login.test/?next=%2Fapp%2Fpage%3Fx%3D1"


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Mode": "navigate", "Accept": "text/html,*/*;q=0.8"}, {"Accept": "text/html"}],
    ids=["navigate", "accept-html"],
)
def test_navigations_are_redirected_to_login(gateway: GatewayProcess, headers: dict[str, str]) -> None:
    response = httpx.get(f"{gateway.url}/app/page?x=1", headers=headers)
    assert response.status_code == 302
    assert response.headers["location"] == "https://login.test/?next=%2Fapp%2Fpage%3Fx%3D1"


# --- (f) cookie hygiene ----------------------------------------------------------------------


def test_duplicated_or_garbage_cookies_are_treated_as_absent(gateway: GatewayProcess, idp: IdPProcess) -> None:
    _, access, refresh = log_in(gateway)
    refreshes = stat(idp, "refresh_calls")
    cookies: list[bytes] = [
        f"{ACCESS}={access}; {ACCESS}={access}".encode(),
        f"{ACCESS}=x; {ACCESS}={access}".encode(),
        f"{REFRESH}={refresh}; {REFRESH}={refresh}".encode(),
        f"{ACCESS}={access}; {ACCESS}={access}; {REFRESH}={refresh}; {REFRESH}=other".encode(),
        f"{ACCESS}=".encode(),
        f'{ACCESS}=""'.encode(),
        f"{ACCESS}=".encode() + "\u00e9t\u00e9".encode(),
        f"{ACCESS}=".encode() + b"\xff\xfe\xfd",
        b"=; ==; ;;; " + f"{ACCESS}".encode(),
    ]
    for cookie in cookies:
        api = httpx.get(f"{gateway.url}/app", headers={"Cookie": cookie})
        assert api.status_code == 401, cookie
        assert api.json()["reason"] == "no_token", cookie
        page = httpx.get(f"{gateway.url}/app", headers={"Cookie": cookie, "Accept": "text/html"})
        assert page.status_code == 302 and page.headers["location"].startswith("https://login.test/"), cookie
    assert stat(idp, "refresh_calls") == refreshes  # a duplicated refresh cookie is never redeemed


def test_malformed_access_cookie_is_401_never_500(gateway: GatewayProcess) -> None:
    for value in ["not-a-jwt", "a.b.c", "%%%", "eyJhbGciOiJub25lIn0.e30.", "x" * 3000]:
        api = httpx.get(f"{gateway.url}/app", headers={"Cookie": f"{ACCESS}={value}"})
        assert api.status_code == 401, value
        page = httpx.get(f"{gateway.url}/app", headers={"Cookie": f"{ACCESS}={value}", "Accept": "text/html"})
        assert page.status_code == 302, value


def test_unreadable_access_cookie_with_a_good_refresh_cookie_refreshes(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    _, _, refresh = log_in(gateway)
    refreshes = stat(idp, "refresh_calls")
    cookie = f"{ACCESS}=".encode() + b"\xff\xfe; " + f"{REFRESH}={refresh}".encode()
    response = httpx.get(f"{gateway.url}/app", headers={"Cookie": cookie})
    assert response.status_code == 200
    assert stat(idp, "refresh_calls") == refreshes + 1
    assert set_cookies(response)[ACCESS].value
