"""{prefix}/userinfo in-process: the session's allowed claims, refreshed when due, JSON 401s (gateway/userinfo.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from support.fakes import RecordingUpstream
from support.sealed import refresh_cookie

from gateway.app import Gateway, create_app
from gateway.config import parse_config
from gateway.demo.idp import IdentityProvider, IdPSettings
from gateway.errors import ConfigError

SECRET = IdPSettings.hs_secret
STORE_SECRET = "userinfo-tests-store-secret"
ALICE = {
    "sub": "alice",
    "name": "Alice Admin",
    "email": "alice@example.test",
    "roles": ["admin"],
    "is_staff": True,
    "jti": "j-alice",
    "aud": "legacy-app",
}


def config(**identity: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "store": {"url": "memory://", "secret": STORE_SECRET},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": "http://idp.test/token",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
        },
        "cookies": {"secure": False},
        "identity": identity,
        "login": {"url": "https://login.example/?next={next}"},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
    }


@pytest.fixture
def upstream() -> RecordingUpstream:
    return RecordingUpstream()


@pytest.fixture
def gateway(idp_app: Starlette, upstream: RecordingUpstream) -> Gateway:
    return create_app(parse_config(config()), forwarder=upstream)


def token(ttl: float = 600, **claims: Any) -> str:
    return jwt.encode({"exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256")


def sealed(refresh: str) -> str:
    return refresh_cookie(refresh, "gw_refresh", STORE_SECRET)


async def ask(
    app: Gateway, headers: dict[str, str] | None = None, *, method: str = "GET", path: str = "/.gateway/userinfo"
) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.example") as http:
        return await http.request(method, path, headers=headers)


def set_cookies(response: httpx.Response) -> dict[str, str]:
    return {line.split("=", 1)[0]: line for line in response.headers.get_list("set-cookie")}


async def test_a_valid_cookie_gets_the_allowed_claims_only(gateway: Gateway, upstream: RecordingUpstream) -> None:
    access = token(**ALICE)
    answer = await ask(gateway, {"Cookie": f"gw_access={access}"})
    assert answer.status_code == 200
    assert answer.json() == {
        "sub": "alice",
        "name": "Alice Admin",
        "email": "alice@example.test",
        "roles": ["admin"],
        "exp": jwt.decode(access, options={"verify_signature": False})["exp"],
    }
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["vary"] == "Cookie, Authorization"
    assert answer.headers["content-type"] == "application/json"
    assert access not in answer.text and "set-cookie" not in answer.headers
    assert upstream.seen == []  # answered by the gateway, never forwarded
    again = await ask(gateway, {"Cookie": f"gw_access={access}"})  # the fast path answers the same
    assert again.json() == answer.json()


async def test_a_bearer_token_works_too_and_head_has_no_body(gateway: Gateway) -> None:
    bearer = {"Authorization": f"Bearer {token(sub='bob', email='bob@example.test', aud='legacy-app')}"}
    answer = await ask(gateway, bearer)
    assert answer.status_code == 200 and answer.json()["sub"] == "bob" and "name" not in answer.json()
    head = await ask(gateway, bearer, method="HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == answer.headers["content-length"]


async def test_the_allow_list_comes_from_the_config(idp_app: Starlette) -> None:
    namespaced = "https://app.example/roles"
    app = create_app(parse_config(config(userinfo_claims=["sub", namespaced, "is_staff"])))
    answer = await ask(app, {"Cookie": f"gw_access={token(**ALICE, **{namespaced: ['x']})}"})
    assert set(answer.json()) == {"sub", namespaced, "is_staff", "exp"}
    nothing = create_app(parse_config(config(userinfo_claims=[])))
    assert set((await ask(nothing, {"Cookie": f"gw_access={token(**ALICE)}"})).json()) == {"exp"}


@pytest.mark.parametrize(
    "browser",
    [{}, {"Accept": "text/html,application/xhtml+xml"}, {"Sec-Fetch-Mode": "navigate", "Accept": "text/html"}],
    ids=["script", "accept-html", "navigation"],
)
async def test_no_session_is_a_json_401_even_for_a_browser(gateway: Gateway, browser: dict[str, str]) -> None:
    answer = await ask(gateway, browser)
    assert answer.status_code == 401  # never a login redirect: the page asked with fetch
    assert answer.json() == {"error": "invalid_token", "reason": "no_token"}
    assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["vary"] == "Cookie, Authorization"


async def test_a_revoked_token_is_401_and_its_cookie_cleared(gateway: Gateway) -> None:
    access = token(**ALICE)
    assert (await ask(gateway, {"Cookie": f"gw_access={access}"})).status_code == 200
    await gateway.shared.denylist.deny("j-alice", time.time() + 600)
    refused = await ask(gateway, {"Cookie": f"gw_access={access}"})
    assert refused.status_code == 401 and refused.json()["reason"] == "token_revoked"
    assert "Max-Age=0" in set_cookies(refused)["gw_access"]


async def test_an_expired_session_is_refreshed_and_the_rotated_cookies_set(
    gateway: Gateway, idp: IdentityProvider
) -> None:
    session = idp.start_session("alice", ttl=-60)
    cookie = {"Cookie": f"gw_access={session.access}; gw_refresh={sealed(session.refresh)}"}
    answer = await ask(gateway, cookie)
    assert answer.status_code == 200
    assert answer.json()["sub"] == "alice" and answer.json()["email"] == "alice@example.com"
    assert answer.json()["exp"] > time.time()
    assert idp.counters.refresh_calls == 1
    rotated = set_cookies(answer)
    assert set(rotated) == {"gw_access", "gw_refresh"}
    assert answer.headers["cache-control"] == "no-store"
    new = {name: line.split(";", 1)[0].split("=", 1)[1] for name, line in rotated.items()}
    follow = await ask(gateway, {"Cookie": f"gw_access={new['gw_access']}; gw_refresh={new['gw_refresh']}"})
    assert follow.status_code == 200 and "set-cookie" not in follow.headers
    assert idp.counters.refresh_calls == 1


async def test_a_session_the_idp_ended_is_401_with_both_cookies_cleared(
    gateway: Gateway, idp: IdentityProvider
) -> None:
    session = idp.start_session("alice", ttl=-60)
    idp.revoke_family(session.family)
    answer = await ask(gateway, {"Cookie": f"gw_access={session.access}; gw_refresh={sealed(session.refresh)}"})
    assert answer.status_code == 401 and answer.json()["reason"] == "invalid_grant"
    cleared = set_cookies(answer)
    assert set(cleared) == {"gw_access", "gw_refresh"} and all("Max-Age=0" in c for c in cleared.values())


async def test_an_idp_outage_is_503_with_the_cookies_kept(gateway: Gateway, idp: IdentityProvider) -> None:
    session = idp.start_session("alice", ttl=-60)
    idp.behaviour.fail = "503"
    answer = await ask(gateway, {"Cookie": f"gw_access={session.access}; gw_refresh={sealed(session.refresh)}"})
    assert answer.status_code == 503 and answer.json()["reason"] == "idp_error"
    assert answer.headers["retry-after"] == "5" and "set-cookie" not in answer.headers


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405(gateway: Gateway, method: str) -> None:
    answer = await ask(gateway, {"Cookie": f"gw_access={token(**ALICE)}"}, method=method)
    assert answer.status_code == 405 and answer.json()["reason"] == "method_not_allowed"
    assert answer.headers["allow"] == "GET, HEAD"


async def test_only_the_exact_path_is_userinfo(gateway: Gateway, upstream: RecordingUpstream) -> None:
    assert (await ask(gateway, path="/.gateway/userinfo/x")).status_code == 404
    # Outside the prefix it is an ordinary path of a route.
    bearer = {"Authorization": f"Bearer {token(**ALICE)}"}
    assert (await ask(gateway, bearer, path="/userinfo")).text == "ok" and len(upstream.seen) == 1


@pytest.mark.parametrize("claims", [["sub", ""], ["sub", "sub"]])
def test_the_allow_list_is_checked(claims: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(userinfo_claims=claims))
    assert any(p.startswith("identity.userinfo_claims") for p in info.value.problems)
