"""Opaque access tokens against a real provider: django-oauth-toolkit (tests/support/dot_provider/), whose access
tokens are random strings only it can read, whose refresh tokens rotate with reuse protection. `gateway serve`
(2 workers, Redis) logs in with OIDC there, asks its RFC 7662 endpoint what each token means, and refreshes."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.servers import GatewayProcess, ServerProcess, set_cookies, start_gateway, start_upstream

TESTS = Path(__file__).resolve().parents[1]
CLIENT = {"client_id": "gateway", "client_secret": "gateway-client-secret"}
CACHE = 1.0  # seconds the gateway keeps an introspection answer: short, so an expiry at the provider shows soon


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`python -m support.dot_provider`: migrates, registers the gateway's client and users, serves DOT."""
    server = ServerProcess("support.dot_provider", lambda port: ["--port", str(port)], ready_path="/_test/stats")
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    server.env = {**os.environ, "PYTHONPATH": path, "DOT_DIR": str(tmp_path_factory.mktemp("dot-provider"))}
    with server.start():
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    with start_upstream() as server:
        yield server


def gateway_config(provider: ServerProcess, upstream: ServerProcess, redis_url: str, **tokens: Any) -> Any:
    prefix = f"gwtest:{os.urandom(4).hex()}:"

    def config(port: int) -> dict[str, Any]:
        return {
            "store": {"url": redis_url, "key_prefix": prefix, "secret": "opaque-tests-secret"},
            "tokens": tokens,
            "refresh": {
                "endpoint": f"{provider.url}/o/token/",
                "revocation_endpoint": f"{provider.url}/o/revoke_token/",
                **CLIENT,
            },
            "cookies": {"secure": False},
            "identity": {"headers": {"X-Auth-User": "username", "X-Auth-Scope": "scope"}},
            "login": {
                "oidc": {
                    "issuer": f"{provider.url}/o",
                    **CLIENT,
                    "scopes": ["openid", "read"],
                    "redirect_url": f"http://127.0.0.1:{port}/.gateway/callback",
                }
            },
            "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
        }

    return config


@pytest.fixture(scope="module")
def gateway(provider: ServerProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    introspection = {"endpoint": f"{provider.url}/o/introspect/", **CLIENT, "cache": CACHE}
    config = gateway_config(
        provider,
        upstream,
        redis_url,
        introspection=introspection,
        required_claims=["exp", "username"],
        refresh_before=5,
    )
    with start_gateway(config, workers=2) as server:
        yield server


def log_in(gateway: GatewayProcess, provider: ServerProcess, user: str = "alice") -> dict[str, str]:
    """What a browser does: the gateway's login, DOT's login form, its authorize (no consent), the callback."""
    to_provider = httpx.get(f"{gateway.url}/.gateway/login", params={"next": "/whoami"})
    assert to_provider.status_code == 302, to_provider.text
    state = set_cookies(to_provider)["gw_oidc"].value
    with httpx.Client(base_url=provider.url) as browser:
        to_login = browser.get(to_provider.headers["location"])
        assert to_login.status_code == 302 and "/accounts/login/" in to_login.headers["location"]
        form = browser.get(to_login.headers["location"])
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        next_field = re.search(r'name="next" value="([^"]*)"', form.text)
        assert csrf and next_field
        fields = {"csrfmiddlewaretoken": csrf.group(1), "next": unescape(next_field.group(1))}
        signed_in = browser.post(
            to_login.headers["location"], data=fields | {"username": user, "password": f"{user}-password"}
        )
        assert signed_in.status_code == 302, signed_in.text[:300]
        to_callback = browser.get(signed_in.headers["location"])
        assert to_callback.status_code == 302 and to_callback.headers["location"].startswith(gateway.url)
    done = httpx.get(to_callback.headers["location"], headers={"Cookie": f"gw_oidc={state}"})
    assert done.status_code == 302, done.text  # before: a raw JSON idp_bad_response page
    assert done.headers["location"] == "/whoami"
    cookies = set_cookies(done)
    return {"gw_access": cookies["gw_access"].value, "gw_refresh": cookies["gw_refresh"].value}


def cookie_header(session: dict[str, str]) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{name}={value}" for name, value in session.items())}


def identity(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.json()["headers"] if name.startswith("x-auth-")}


def control(provider: ServerProcess, what: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.post(f"{provider.url}/_test/{what}", json=body or {}, timeout=5)
    response.raise_for_status()
    return response.json()


def stats(provider: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{provider.url}/_test/stats", timeout=5).json())


def test_login_and_requests_carry_the_introspected_identity(gateway: GatewayProcess, provider: ServerProcess) -> None:
    session = log_in(gateway, provider, "bob")
    assert len(session["gw_access"]) < 100 and session["gw_access"].count(".") != 2  # opaque, not a JWT
    for _ in range(3):
        page = httpx.get(f"{gateway.url}/whoami", headers=cookie_header(session))
        assert page.status_code == 200
        assert identity(page) == {"x-auth-user": "bob", "x-auth-scope": "openid read"}
    bearer = httpx.get(f"{gateway.url}/api", headers={"Authorization": f"Bearer {session['gw_access']}"})
    assert bearer.status_code == 200 and identity(bearer)["x-auth-user"] == "bob"


def test_an_expired_token_is_refreshed_once_under_a_burst_then_the_old_one_is_refused(
    gateway: GatewayProcess, provider: ServerProcess
) -> None:
    session = log_in(gateway, provider)
    assert httpx.get(f"{gateway.url}/whoami", headers=cookie_header(session)).status_code == 200
    control(provider, "expire", {"username": "alice"})
    time.sleep(CACHE + 0.2)  # the gateway's cached answer lapses
    before = stats(provider)

    def one(_: int) -> httpx.Response:
        return httpx.get(f"{gateway.url}/whoami", headers=cookie_header(session), timeout=15)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert all(identity(a)["x-auth-user"] == "alice" for a in answers)
    after = stats(provider)
    # One redemption at DOT for the whole burst, across both workers: a second would be refused
    # (ROTATE_REFRESH_TOKEN revoked it) and, with reuse protection, end the session.
    assert after["grants"][len(before["grants"]) :] == ["refresh_token"]
    assert after["refresh_tokens"] == before["refresh_tokens"] + 1
    new = {set_cookies(a)["gw_access"].value for a in answers if "gw_access" in set_cookies(a)}
    assert len(new) == 1 and session["gw_access"] not in new
    successor = {"gw_access": new.pop(), "gw_refresh": set_cookies(answers[0])["gw_refresh"].value}
    page = httpx.get(f"{gateway.url}/whoami", headers=cookie_header(successor))
    assert page.status_code == 200 and identity(page)["x-auth-user"] == "alice"
    # The old access token, inactive at DOT, without a refresh cookie: 401 (Bearer: token_expired).
    alone = httpx.get(f"{gateway.url}/whoami", headers={"Cookie": f"gw_access={session['gw_access']}"})
    assert alone.status_code == 401
    bearer = httpx.get(f"{gateway.url}/api", headers={"Authorization": f"Bearer {session['gw_access']}"})
    assert bearer.status_code == 401 and bearer.json()["reason"] == "token_expired"


def test_introspection_down_is_503_with_the_session_kept(gateway: GatewayProcess, provider: ServerProcess) -> None:
    session = log_in(gateway, provider)
    time.sleep(CACHE + 0.2)  # not from the cache: the gateway must ask
    control(provider, "introspection", {"state": "down"})
    try:
        down = httpx.get(f"{gateway.url}/whoami", headers=cookie_header(session))
    finally:
        control(provider, "introspection", {"state": "up"})
    assert down.status_code == 503 and down.headers["retry-after"]
    assert down.json()["reason"] == "introspection_unavailable"
    assert "gw_access" not in set_cookies(down) and "gw_refresh" not in set_cookies(down)  # not a logout
    back = httpx.get(f"{gateway.url}/whoami", headers=cookie_header(session))
    assert back.status_code == 200 and identity(back)["x-auth-user"] == "alice"


def test_logout_refuses_the_opaque_token_at_once_on_every_worker(
    provider: ServerProcess, upstream: ServerProcess, redis_url: str
) -> None:
    """With answers cached for a minute, only the shared denylist (jti opaque:<hash>) can refuse the token at once."""
    introspection = {"endpoint": f"{provider.url}/o/introspect/", **CLIENT, "cache": 60}
    config = gateway_config(
        provider, upstream, redis_url, introspection=introspection, required_claims=["exp", "username"]
    )
    with start_gateway(config, workers=2) as gateway:
        session = log_in(gateway, provider, "bob")
        bearer = {"Authorization": f"Bearer {session['gw_access']}"}
        for _ in range(4):  # both workers have the answer cached
            assert httpx.get(f"{gateway.url}/api", headers=bearer).status_code == 200
        out = httpx.post(f"{gateway.url}/.gateway/logout", headers=cookie_header(session))
        assert out.status_code == 204
        for _ in range(4):
            refused = httpx.get(f"{gateway.url}/api", headers=bearer)
            # The denylist refuses it (token_revoked). A worker that had no answer cached and has not heard of
            # the logout yet asks the provider, which revoked the token with its refresh token (token_expired).
            assert refused.status_code == 401 and refused.json()["reason"] in ("token_revoked", "token_expired")
        again = httpx.get(f"{gateway.url}/whoami", headers=cookie_header(session))
        assert again.status_code == 401  # the session's refresh token is dead too


def test_userinfo_instead_of_introspection_gives_the_identity(
    provider: ServerProcess, upstream: ServerProcess, redis_url: str
) -> None:
    config = gateway_config(provider, upstream, redis_url, userinfo={"endpoint": f"{provider.url}/o/userinfo/"})

    def headers(port: int) -> dict[str, Any]:
        data = config(port)
        data["identity"] = {"headers": {"X-Auth-User": "preferred_username", "X-Auth-Email": "email"}}
        return dict(data)

    with start_gateway(headers) as gateway:
        session = log_in(gateway, provider, "bob")
        page = httpx.get(f"{gateway.url}/whoami", headers=cookie_header(session))
        assert page.status_code == 200
        assert identity(page) == {"x-auth-user": "bob", "x-auth-email": "bob@example.com"}
