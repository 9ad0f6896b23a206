"""The request path in-process: the known-token fast path decides exactly as the full path does.

A token verified once is served from the admission fast path (gateway.admission) afterwards (no signature check, no
header re-parse). These tests make sure the cache is keyed by the credential actually in use and
that revocation, expiry and per-route claim rules still bite on a cached token.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest
from support.fakes import RecordingUpstream

from gateway import app as app_module
from gateway.app import Gateway, create_app
from gateway.config import parse_config

SECRET = "pipeline-tests-secret-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def upstream() -> RecordingUpstream:
    return RecordingUpstream()


@pytest.fixture
async def gateway(clock: Clock, upstream: RecordingUpstream) -> Gateway:
    config = parse_config(
        {
            "server": {"access_log": False},
            "tokens": {"algorithms": ["HS256"], "secret": SECRET, "leeway": 0, "refresh_before": 30},
            "cookies": {"secure": False},
            "routes": [
                {
                    "name": "admin",
                    "path": "/admin/",
                    "upstream": "http://127.0.0.1:9",
                    "require": {"claims": {"roles": "admin"}},
                },
                {"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"},
            ],
        }
    )
    return create_app(config, forwarder=upstream, clock=clock)


def token(clock: Clock, sub: str, ttl: float = 600, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(clock.now + ttl), **claims}, SECRET, algorithm="HS256")


async def get(
    app: Gateway, path: str = "/x", headers: Any = None, cookies: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw", cookies=cookies
    ) as client:
        return await client.get(path, headers=headers)


async def test_a_known_token_is_refused_once_revoked(gateway: Gateway, clock: Clock) -> None:
    bearer = {"Authorization": f"Bearer {token(clock, 'alice', jti='j-1')}"}
    assert (await get(gateway, headers=bearer)).status_code == 200
    assert (await get(gateway, headers=bearer)).status_code == 200  # now from the cache
    await gateway.shared.denylist.deny("j-1", clock.now + 600)
    refused = await get(gateway, headers=bearer)
    assert refused.status_code == 401 and refused.json()["reason"] == "token_revoked"


async def test_a_known_token_still_expires_on_time(gateway: Gateway, clock: Clock) -> None:
    bearer = {"Authorization": f"Bearer {token(clock, 'alice', ttl=100)}"}
    assert (await get(gateway, headers=bearer)).status_code == 200
    clock.now += 80  # inside refresh_before: the full path decides again, and still says yes
    assert (await get(gateway, headers=bearer)).status_code == 200
    clock.now += 21
    refused = await get(gateway, headers=bearer)
    assert refused.status_code == 401 and refused.json()["reason"] == "token_expired"


async def test_cached_identity_follows_the_credential_in_use(
    gateway: Gateway, upstream: RecordingUpstream, clock: Clock
) -> None:
    """A non-Bearer Authorization header must not become the cache key for a cookie's identity."""
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    for user in ("alice", "bob", "alice"):
        response = await get(gateway, headers=basic, cookies={"gw_access": token(clock, user)})
        assert response.status_code == 200
        assert upstream.seen[-1]["x-auth-user"] == user
    # Bearer wins over the cookie, cached or not.
    carol = {"Authorization": f"Bearer {token(clock, 'carol')}"}
    for _ in range(2):
        await get(gateway, headers=carol, cookies={"gw_access": token(clock, "alice")})
        assert upstream.seen[-1]["x-auth-user"] == "carol"


async def test_route_claim_rules_apply_to_a_cached_token(gateway: Gateway, clock: Clock) -> None:
    bearer = {"Authorization": f"Bearer {token(clock, 'alice', roles=['user'])}"}
    assert (await get(gateway, "/x", headers=bearer)).status_code == 200
    refused = await get(gateway, "/admin/panel", headers=bearer)
    assert refused.status_code == 403 and refused.json()["reason"] == "claims_denied"
    admin = {"Authorization": f"Bearer {token(clock, 'root', roles=['admin'])}"}
    assert (await get(gateway, "/admin/panel", headers=admin)).status_code == 200


async def test_two_bearer_headers_are_refused_even_when_each_is_known(gateway: Gateway, clock: Clock) -> None:
    first, second = token(clock, "alice"), token(clock, "bob")
    for each in (first, second):
        assert (await get(gateway, headers={"Authorization": f"Bearer {each}"})).status_code == 200
    both = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
    refused = await get(gateway, headers=both)
    # RFC 6750 §3.1: a request with two credentials is malformed (400), not unauthenticated.
    assert refused.status_code == 400 and refused.json()["reason"] == "invalid_request"


async def test_request_ids_are_unique_and_a_sane_client_id_is_kept(
    gateway: Gateway, upstream: RecordingUpstream, clock: Clock
) -> None:
    bearer = {"Authorization": f"Bearer {token(clock, 'alice')}"}
    ids = {(await get(gateway, headers=bearer)).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 24 for i in ids)
    kept = await get(gateway, headers={**bearer, "X-Request-ID": "trace-1"})
    assert kept.headers["x-request-id"] == "trace-1" and upstream.seen[-1]["x-request-id"] == "trace-1"
    replaced = await get(gateway, headers={**bearer, "X-Request-ID": "not sane!"})
    assert replaced.headers["x-request-id"] == upstream.seen[-1]["x-request-id"] != "not sane!"


# --- opaque access tokens: the fast path stops where the introspection answer's cache ends ---


async def test_an_introspected_token_takes_the_fast_path_until_the_cache_bound(
    clock: Clock, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[dict[str, Any]] = []

    def introspect(request: httpx.Request) -> httpx.Response:
        answers.append({})
        return httpx.Response(200, json=answer)

    mock = httpx.MockTransport(introspect)
    monkeypatch.setattr(app_module, "control_client", lambda timeout: httpx.AsyncClient(transport=mock))
    answer: dict[str, Any] = {"active": True, "username": "dora", "exp": int(clock.now + 3600)}
    config = parse_config(
        {
            "server": {"access_log": False},
            "tokens": {
                "introspection": {"endpoint": "https://idp.test/introspect", "client_id": "gw", "cache": 60},
                "required_claims": ["exp", "username"],
            },
            "identity": {"headers": {"X-Auth-User": "username"}},
            "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
        }
    )
    app = create_app(config, forwarder=upstream, clock=clock)
    bearer = {"Authorization": "Bearer opaque-1"}
    for _ in range(3):
        assert (await get(app, headers=bearer)).status_code == 200
    assert len(answers) == 1 and upstream.seen[-1]["x-auth-user"] == "dora"
    clock.now += 60  # the answer's cache bound: asked again
    assert (await get(app, headers=bearer)).status_code == 200 and len(answers) == 2
    answer = {"active": False}  # revoked at the IdP
    assert (await get(app, headers=bearer)).status_code == 200 and len(answers) == 2  # still cached
    clock.now += 60
    refused = await get(app, headers=bearer)
    assert refused.status_code == 401 and refused.json()["reason"] == "token_expired" and len(answers) == 3
