"""Forward-auth with real front proxies: nginx `auth_request` and Caddy, run from docs/forward-auth.md, in front of
`gateway serve --workers 2` (redis-server, the rotating demo IdP as an OpenID provider, the echo upstream)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from support.configs import demo_refresh, oidc_login
from support.frontproxies import FrontProxy
from support.sealed import refresh_cookie
from support.servers import GatewayProcess, IdPProcess, ServerProcess, set_cookies, start_gateway, start_idp
from support.waiting import wait_until

ACCESS, REFRESH = "gw_access", "gw_refresh"
SECRET = "store-secret-for-tests"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(algorithm="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    prefix = f"gwtest:{os.urandom(4).hex()}:"

    def config(port: int) -> dict[str, Any]:
        return {
            "server": {"trusted_proxies": ["127.0.0.1"]},
            "store": {"url": redis_url, "key_prefix": prefix, "secret": SECRET},
            "tokens": {"algorithms": ["RS256"], "jwks_url": f"{idp.url}/jwks", "issuer": idp.url, "leeway": 0},
            "refresh": demo_refresh(idp),
            "cookies": {"secure": False},
            "login": oidc_login(idp, port),
            "routes": [
                {
                    "name": "admin",
                    "path": "/admin/",
                    "upstream": upstream.url,
                    "require": {"claims": {"roles": "admin"}},
                },
                {
                    "name": "admin-host",
                    "host": "admin.test",
                    "path": "/",
                    "upstream": upstream.url,
                    "require": {"claims": {"roles": "admin"}},
                },
                {"name": "app", "path": "/", "upstream": upstream.url},
            ],
        }

    with start_gateway(config, workers=2) as server:
        yield server


@pytest.fixture(scope="module", params=["nginx", "nginx-cached", "caddy"])
def front(request: pytest.FixtureRequest, gateway: GatewayProcess, upstream: ServerProcess) -> Iterator[FrontProxy]:
    with FrontProxy(request.param, urlsplit(gateway.url).netloc, urlsplit(upstream.url).netloc) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def healthy_idp(idp: IdPProcess) -> Iterator[None]:
    idp.reset()
    yield


def cookie_header(access: str | None, refresh: str | None) -> str:
    parts = [f"{ACCESS}={access}"] if access else []
    return "; ".join([*parts, f"{REFRESH}={refresh_cookie(refresh, REFRESH)}"] if refresh else parts)


def upstream_saw(response: httpx.Response) -> dict[str, str]:
    """The headers the echo upstream received (lower-cased names)."""
    assert response.status_code == 200, response.text
    return {name.lower(): value for name, value in response.json()["headers"]}


def refresh_calls(idp: IdPProcess) -> int:
    return idp.stats()["refresh_calls"]


def test_a_browser_logs_in_through_the_front_proxy(front: FrontProxy, gateway: GatewayProcess, idp: IdPProcess) -> None:
    first = httpx.get(f"{front.url}/reports?year=2024", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"})
    assert first.status_code == 302
    login = urljoin(front.url, first.headers["location"])
    assert urlsplit(login).path == "/.gateway/login"
    to_idp = httpx.get(login)  # through the front proxy's /.gateway/ location
    assert to_idp.status_code == 302
    callback = idp.sign_in(to_idp.headers["location"], "alice")
    done = httpx.get(callback, headers={"Cookie": f"gw_oidc={set_cookies(to_idp)['gw_oidc'].value}"})
    assert done.status_code == 302 and done.headers["location"] == "/reports?year=2024"
    session = set_cookies(done)
    page = httpx.get(
        f"{front.url}/reports?year=2024",
        headers={"Cookie": cookie_header(session[ACCESS].value, session[REFRESH].value)},
    )
    seen = upstream_saw(page)
    assert seen["x-auth-user"] == "alice" and seen["x-auth-roles"] == "user,admin"
    assert page.json()["path"] == "/reports"


def test_an_expired_session_is_refreshed_once_and_the_rotated_cookies_reach_the_client(
    front: FrontProxy, idp: IdPProcess
) -> None:
    session = idp.issue("alice", access_ttl=-60)
    before = refresh_calls(idp)
    page = httpx.get(f"{front.url}/page", headers={"Cookie": cookie_header(session["access"], session["refresh"])})
    assert upstream_saw(page)["x-auth-user"] == "alice"
    rotated = set_cookies(page)
    assert rotated[ACCESS].value and rotated[ACCESS].value != session["access"]
    assert rotated[REFRESH].value and rotated[REFRESH]["httponly"]
    assert refresh_calls(idp) == before + 1
    # The rotated cookies work on their own, with no further IdP call.
    again = httpx.get(
        f"{front.url}/page", headers={"Cookie": cookie_header(rotated[ACCESS].value, rotated[REFRESH].value)}
    )
    assert upstream_saw(again)["x-auth-user"] == "alice" and "set-cookie" not in again.headers
    assert refresh_calls(idp) == before + 1


def test_no_session_is_401_and_claims_that_fail_the_route_are_403(front: FrontProxy, idp: IdPProcess) -> None:
    anonymous = httpx.get(f"{front.url}/api/items", headers={"Accept": "application/json"})
    assert anonymous.status_code == 401
    bob = idp.issue("bob")
    forbidden = httpx.get(f"{front.url}/admin/users", headers={"Cookie": cookie_header(bob["access"], bob["refresh"])})
    assert forbidden.status_code == 403
    alice = idp.issue("alice")
    allowed = httpx.get(
        f"{front.url}/admin/users", headers={"Cookie": cookie_header(alice["access"], alice["refresh"])}
    )
    assert upstream_saw(allowed)["x-auth-user"] == "alice"


def test_a_session_the_idp_ended_is_cleared_at_the_client(front: FrontProxy, idp: IdPProcess) -> None:
    session = idp.issue("alice", access_ttl=-60)
    httpx.post(f"{idp.url}/revoke", data={"token": session["refresh"]}, auth=("legacy-app", "demo-secret"))
    ended = httpx.get(f"{front.url}/page", headers={"Cookie": cookie_header(session["access"], session["refresh"])})
    assert ended.status_code == 401
    cleared = set_cookies(ended)
    assert cleared[ACCESS]["max-age"] == "0" and cleared[REFRESH]["max-age"] == "0"


IDENTITY = {"x-auth-user", "x-auth-email", "x-auth-roles", "x-gateway-assertion"}


def identity_seen(response: httpx.Response) -> dict[str, list[str]]:
    """Every header the app got that an app may read as an identity header (any case, "_" or "-", HTTP- prefix)."""
    found: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        canonical = name.lower().replace("_", "-")
        while canonical.startswith("http-"):
            canonical = canonical[len("http-") :]
        if canonical in IDENTITY:
            found.setdefault(canonical, []).append(value)
    return found


def test_a_clients_own_identity_headers_never_reach_the_app(front: FrontProxy, idp: IdPProcess) -> None:
    bob = idp.issue("bob", claims={"email": None})  # no email claim: the gateway answers an empty X-Auth-Email
    forged = [
        ("X-Auth-User", "admin"),
        ("X-Auth-Email", "boss@example.com"),
        ("X-Auth-Roles", "admin"),
        ("X_Auth_User", "admin"),
        ("HTTP-X-Auth-User", "admin"),
        ("X-Gateway-Assertion", "replayed"),
    ]
    headers = [("Cookie", cookie_header(bob["access"], bob["refresh"])), *forged]
    page = httpx.get(f"{front.url}/page", headers=headers)
    assert page.status_code == 200
    seen = identity_seen(page)
    assert seen.pop("x-auth-user") == ["bob"] and seen.pop("x-auth-roles") == ["user"]
    assert all(value == "" for values in seen.values() for value in values), seen


def test_a_clients_own_forward_auth_headers_never_outvote_the_proxy(front: FrontProxy, idp: IdPProcess) -> None:
    bob = idp.issue("bob")
    cookie = ("Cookie", cookie_header(bob["access"], bob["refresh"]))
    for smuggled in (
        [("X-Original-URI", "/page"), ("X-Original-Method", "GET")],
        [("X-Forwarded-Uri", "/page"), ("X-Forwarded-Method", "GET")],
    ):
        # bob may not see /admin/: a header naming another path or method must not change that.
        assert httpx.get(f"{front.url}/admin/users", headers=[cookie, *smuggled]).status_code in (400, 403)
    alice = idp.issue("alice")
    forged_post = [
        ("Cookie", cookie_header(alice["access"], alice["refresh"])),
        ("Origin", "https://evil.example"),
        ("X-Original-Method", "GET"),
        ("X-Forwarded-Method", "GET"),
    ]
    assert httpx.post(f"{front.url}/transfer", headers=forged_post).status_code in (400, 403)


def test_the_host_the_app_gets_is_the_host_that_was_authorised(front: FrontProxy, idp: IdPProcess) -> None:
    bob = idp.issue("bob")
    headers = {"Cookie": cookie_header(bob["access"], bob["refresh"]), "Host": "admin.test"}
    assert httpx.get(f"{front.url}/page", headers=headers).status_code == 403
    # A client's X-Forwarded-Host must not make the gateway judge another host's route.
    smuggled = {**headers, "X-Forwarded-Host": "127.0.0.1"}
    assert httpx.get(f"{front.url}/page", headers=smuggled).status_code == 403


def test_a_fragment_in_the_request_target_never_reaches_a_route_it_was_not_judged_for(
    front: FrontProxy, idp: IdPProcess
) -> None:
    # nginx passes "/admin#/users" on as it came, to the gateway as X-Original-URI and to the app, which reads the
    # path /admin: the gateway judged "/admin#/users" a path of the catch-all route, and bob reached the admin route.
    bob = idp.issue("bob")
    head = f"GET /admin#/users HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie_header(bob['access'], bob['refresh'])}"
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as conn:
        conn.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    app_path = json.loads(answer.partition(b"\r\n\r\n")[2])["path"] if status == 200 else None
    assert status != 200 or (app_path != "/admin" and not app_path.startswith("/admin/")), (status, app_path)


def test_a_cross_site_post_on_the_session_cookie_is_refused(front: FrontProxy, idp: IdPProcess) -> None:
    alice = idp.issue("alice")
    cookie = cookie_header(alice["access"], alice["refresh"])
    forged = httpx.post(f"{front.url}/transfer", headers={"Cookie": cookie, "Origin": "https://evil.example"})
    assert forged.status_code == 403
    own = httpx.post(f"{front.url}/transfer", headers={"Cookie": cookie, "Origin": front.url})
    assert upstream_saw(own)["x-auth-user"] == "alice"


def test_200_concurrent_requests_after_expiry_through_the_front_proxy_make_one_idp_call(
    front: FrontProxy, idp: IdPProcess
) -> None:
    session = idp.issue("alice", access_ttl=-60)
    cookie = cookie_header(session["access"], session["refresh"])
    before = refresh_calls(idp)

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(client.get(f"{front.url}/storm", headers={"Cookie": cookie}) for _ in range(200))
            )

    responses = asyncio.run(storm())
    assert [r.status_code for r in responses] == [200] * 200
    assert refresh_calls(idp) == before + 1
    assert len({set_cookies(r)[REFRESH].value for r in responses}) == 1
    assert all(upstream_saw(r)["x-auth-user"] == "alice" for r in responses)


def test_the_front_proxy_passes_the_gateways_pages_and_only_those(front: FrontProxy, idp: IdPProcess) -> None:
    alice = idp.issue("alice")
    cookie = {"Cookie": cookie_header(alice["access"], alice["refresh"])}
    who = httpx.get(f"{front.url}/.gateway/userinfo", headers=cookie)
    assert who.status_code == 200 and who.json()["sub"] == "alice"
    # The rest of the prefix (metrics, auth/...) is not published: such a path is the app's, behind auth.
    metrics = httpx.get(f"{front.url}/.gateway/metrics", headers=cookie)
    assert "gateway_requests_total" not in metrics.text
    assert httpx.get(f"{front.url}/.gateway/metrics").status_code == 401


# nginx keeping the gateway's answers for a second (docs/forward-auth.md, "with the answer kept for a second").


@pytest.fixture(scope="module")
def cached(gateway: GatewayProcess, upstream: ServerProcess) -> Iterator[FrontProxy]:
    with FrontProxy("nginx-cached", urlsplit(gateway.url).netloc, urlsplit(upstream.url).netloc) as proxy:
        yield proxy


def asked(gateway: GatewayProcess, path: str) -> int:
    """How many times the gateway was asked about ``path`` (its access log lines for it)."""
    return gateway.log().count(f'"{path}"')


def settled_asks(gateway: GatewayProcess, path: str, expected: int) -> int:
    """The number of asks about ``path`` once the log holds ``expected`` of them and a moment has passed."""
    wait_until(lambda: asked(gateway, path) >= expected, f"{expected} asks about {path} in the gateway's log")
    time.sleep(0.3)  # a worker's late line would show up here
    return asked(gateway, path)


def test_a_sessions_answer_is_kept_for_a_second_then_asked_again(
    cached: FrontProxy, gateway: GatewayProcess, idp: IdPProcess
) -> None:
    alice = idp.issue("alice")
    headers = {"Cookie": cookie_header(alice["access"], alice["refresh"])}
    path = f"/kept-{os.urandom(4).hex()}"
    for _ in range(5):
        assert upstream_saw(httpx.get(cached.url + path, headers=headers))["x-auth-user"] == "alice"
    assert settled_asks(gateway, path, 1) == 1
    time.sleep(2.2)  # `proxy_cache_valid 200 1s` keeps it one to two seconds: nginx counts whole seconds
    assert upstream_saw(httpx.get(cached.url + path, headers=headers))["x-auth-user"] == "alice"
    assert settled_asks(gateway, path, 2) == 2


def test_two_sessions_never_share_a_kept_answer(cached: FrontProxy, gateway: GatewayProcess, idp: IdPProcess) -> None:
    path = f"/shared-{os.urandom(4).hex()}"
    for user in ("alice", "bob", "alice", "bob"):
        session = idp.issue(user)
        seen = upstream_saw(httpx.get(cached.url + path, headers={"Cookie": cookie_header(session["access"], None)}))
        assert seen["x-auth-user"] == user
    assert settled_asks(gateway, path, 4) == 4
    # The same token as Bearer is another question than as a cookie.
    carol = idp.issue("carol")
    bearer = httpx.get(cached.url + path, headers={"Authorization": f"Bearer {carol['access']}"})
    assert upstream_saw(bearer)["x-auth-user"] == "carol"


def test_refusals_and_rotations_are_never_kept(cached: FrontProxy, gateway: GatewayProcess, idp: IdPProcess) -> None:
    path = f"/refused-{os.urandom(4).hex()}"
    assert [httpx.get(cached.url + path).status_code for _ in range(3)] == [401] * 3
    assert settled_asks(gateway, path, 3) == 3
    # An expired session: the answer that rotates its cookies is asked again each time (the gateway's
    # grace cache gives the same successor), so every response carries the rotated cookies.
    session = idp.issue("alice", access_ttl=-60)
    headers = {"Cookie": cookie_header(session["access"], session["refresh"])}
    before = refresh_calls(idp)
    path = f"/rotated-{os.urandom(4).hex()}"
    answers = [httpx.get(cached.url + path, headers=headers) for _ in range(3)]
    assert all(upstream_saw(a)["x-auth-user"] == "alice" for a in answers)
    assert len({set_cookies(a)[REFRESH].value for a in answers}) == 1
    assert settled_asks(gateway, path, 3) == 3
    assert refresh_calls(idp) == before + 1


def test_unsafe_methods_and_websocket_handshakes_are_asked_every_time(
    cached: FrontProxy, gateway: GatewayProcess, idp: IdPProcess
) -> None:
    alice = idp.issue("alice")
    cookie = cookie_header(alice["access"], alice["refresh"])
    path = f"/unsafe-{os.urandom(4).hex()}"
    same_site = {"Cookie": cookie, "Origin": cached.url}
    assert [httpx.post(cached.url + path, headers=same_site, content=b"x").status_code for _ in range(2)] == [200] * 2
    assert settled_asks(gateway, path, 2) == 2
    # A kept same-site answer would let this through: the CSRF check must see it.
    cross_site = httpx.post(cached.url + path, headers={"Cookie": cookie, "Origin": "https://evil.test"}, content=b"x")
    assert cross_site.status_code == 403
    path = f"/handshake-{os.urandom(4).hex()}"
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    key = {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    for origin in (cached.url, "https://evil.test"):
        httpx.get(cached.url + path, headers={"Cookie": cookie, "Origin": origin, **upgrade, **key})
    assert settled_asks(gateway, path, 2) == 2
