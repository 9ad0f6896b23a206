"""gateway.introspection: opaque access tokens asked about at the IdP (RFC 7662, OIDC userinfo), cached."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs

import httpx
import pytest

from gateway.config import IntrospectionConfig, TokensConfig, UserinfoConfig
from gateway.introspection import Introspection, OpaqueVerifier, build_verifier
from gateway.keys import StaticKey
from gateway.reasons import Reason
from gateway.tokens import Verifier

NOW = 1_700_000_000.0
ENDPOINT = "https://idp.example/o/introspect/"
USERINFO = "https://idp.example/o/userinfo/"
TOKEN = "opaque-token-0123456789"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class IdP:
    """An introspection (or userinfo) endpoint on an httpx.MockTransport: answers as told, counts the calls."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def calls(self) -> int:
        return len(self.requests)


def active(**claims: Any) -> Callable[[httpx.Request], httpx.Response]:
    body = {"active": True, "username": "alice", "scope": "read", "exp": NOW + 3600, **claims}
    return lambda request: httpx.Response(200, json={k: v for k, v in body.items() if v is not None})


def make(
    idp: IdP,
    clock: Clock,
    *,
    cache: float = 60,
    denied: Any = frozenset(),
    userinfo: bool = False,
    client_auth: str = "basic",
    **tokens: Any,
) -> Verifier:
    if userinfo:
        config = TokensConfig(userinfo=UserinfoConfig(endpoint=USERINFO, cache=cache), **tokens)
    else:
        introspection = IntrospectionConfig(
            endpoint=ENDPOINT, client_id="gateway", client_secret="s3cret", cache=cache, client_auth=client_auth
        )
        config = TokensConfig(introspection=introspection, **tokens)
    client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
    return build_verifier(
        config, StaticKey(None), lambda section: client, token_hash=token_hash, clock=clock, denied=denied
    )


def required(**tokens: Any) -> dict[str, Any]:
    return {"required_claims": ("exp", "username"), **tokens}


async def test_an_active_answer_is_the_claims_and_the_request_follows_rfc_7662() -> None:
    idp = IdP(active())
    verifier = make(idp, Clock(), **required())
    assert isinstance(verifier, OpaqueVerifier)
    verdict = await verifier.verify(TOKEN)
    assert verdict.ok and verdict.claims is not None
    assert verdict.claims["username"] == "alice" and verdict.claims["scope"] == "read"
    assert "active" not in verdict.claims
    request = idp.requests[0]
    assert request.method == "POST" and str(request.url) == ENDPOINT
    assert parse_qs(request.content.decode()) == {"token": [TOKEN], "token_type_hint": ["access_token"]}
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"gateway:s3cret").decode()


async def test_post_client_auth_sends_the_credentials_in_the_form() -> None:
    idp = IdP(active())
    await make(idp, Clock(), client_auth="post", **required()).verify(TOKEN)
    form = parse_qs(idp.requests[0].content.decode())
    assert form["client_id"] == ["gateway"] and form["client_secret"] == ["s3cret"]
    assert "authorization" not in idp.requests[0].headers


async def test_a_cached_answer_costs_no_call_until_the_cache_bound() -> None:
    idp, clock = IdP(active()), Clock()
    verifier = make(idp, clock, cache=60, **required())
    for _ in range(5):
        assert (await verifier.verify(TOKEN)).ok
    assert idp.calls == 1
    clock.now += 59
    assert (await verifier.verify(TOKEN)).ok and idp.calls == 1
    clock.now += 1  # the bound: asked again (a token revoked at the IdP is valid at most `cache` seconds)
    assert (await verifier.verify(TOKEN)).ok and idp.calls == 2


async def test_an_exp_shorter_than_the_bound_ends_the_cached_answer() -> None:
    idp, clock = IdP(active(exp=NOW + 20)), Clock()
    verifier = make(idp, clock, cache=600, leeway=0, refresh_before=5, **required())
    assert (await verifier.verify(TOKEN)).ok
    clock.now += 19
    assert (await verifier.verify(TOKEN)).ok and idp.calls == 1
    idp.answer = lambda request: httpx.Response(200, json={"active": False})
    clock.now += 1
    verdict = await verifier.verify(TOKEN)
    assert idp.calls == 2
    assert verdict.reason == Reason.TOKEN_EXPIRED and verdict.refreshable


async def test_active_false_is_an_expired_token_a_refresh_trigger_and_is_cached() -> None:
    idp = IdP(lambda request: httpx.Response(200, json={"active": False}))
    verifier = make(idp, Clock(), **required())
    for _ in range(3):
        verdict = await verifier.verify(TOKEN)
        assert verdict.claims is None and verdict.reason == Reason.TOKEN_EXPIRED and verdict.refreshable
    assert idp.calls == 1


@pytest.mark.parametrize(
    "answer",
    [
        lambda request: httpx.Response(500, json={"error": "server_error"}),
        lambda request: httpx.Response(503),
        lambda request: httpx.Response(401, json={"error": "invalid_client"}),  # the gateway's credentials
        lambda request: httpx.Response(200, text="<html>maintenance</html>"),
        lambda request: httpx.Response(200, json=["active"]),
        lambda request: httpx.Response(200, json={"active": "yes"}),
        lambda request: httpx.Response(200, json={"active": True, "username": "a", "exp": "tomorrow"}),
        lambda request: httpx.Response(200, content=b"{" + b" " * 70_000 + b"}"),
        lambda request: httpx.Response(200, content=b"[" * 60_000, headers={"content-type": "application/json"}),
        lambda request: httpx.Response(200, content=b'{"active": true, "username": "\xff"}'),
    ],
    ids=["500", "503", "401", "html", "list", "active-string", "exp-string", "huge", "deep", "not-utf8"],
)
async def test_a_failing_or_garbled_endpoint_is_503_not_a_logout_and_is_not_cached(
    answer: Callable[[httpx.Request], httpx.Response], caplog: pytest.LogCaptureFixture
) -> None:
    idp = IdP(answer)
    verifier = make(idp, Clock(), **required())
    verdict = await verifier.verify(TOKEN)
    assert verdict.reason == Reason.INTROSPECTION_UNAVAILABLE and not verdict.refreshable
    assert "answering 503" in caplog.text and TOKEN not in caplog.text
    idp.answer = active()
    assert (await verifier.verify(TOKEN)).ok and idp.calls == 2


async def test_an_unreachable_or_slow_endpoint_is_503() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    verifier = make(IdP(down), Clock(), **required())
    assert (await verifier.verify(TOKEN)).reason == Reason.INTROSPECTION_UNAVAILABLE

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    verifier = make(IdP(slow), Clock(), **required())
    assert (await verifier.verify(TOKEN)).reason == Reason.INTROSPECTION_UNAVAILABLE


async def test_concurrent_requests_with_one_token_make_one_call() -> None:
    calls = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return httpx.Response(200, json={"active": True, "username": "alice", "exp": NOW + 3600})

    introspection = IntrospectionConfig(endpoint=ENDPOINT, client_id="gateway")
    config = TokensConfig(introspection=introspection, required_claims=("exp", "username"))
    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    verifier = OpaqueVerifier(
        config, Introspection(introspection, client), cache=60, token_hash=token_hash, clock=Clock()
    )
    verdicts = await asyncio.gather(*(verifier.verify(TOKEN) for _ in range(20)))
    assert all(v.ok for v in verdicts) and calls == 1


async def test_required_claims_issuer_and_audience_apply_to_the_answer() -> None:
    idp = IdP(active(username=None))
    assert (await make(idp, Clock(), **required()).verify(TOKEN)).reason == Reason.MISSING_CLAIM
    # sub is required by default, and DOT-like answers have none
    assert (await make(IdP(active()), Clock()).verify(TOKEN)).reason == Reason.MISSING_CLAIM
    issuer = required(issuer="https://idp.example")
    assert (await make(IdP(active(iss="https://evil")), Clock(), **issuer).verify(TOKEN)).reason == Reason.WRONG_ISSUER
    assert (await make(IdP(active(iss="https://idp.example")), Clock(), **issuer).verify(TOKEN)).ok
    audience = required(audience="app")
    assert (await make(IdP(active(aud=["other"])), Clock(), **audience).verify(TOKEN)).reason == Reason.WRONG_AUDIENCE
    assert (await make(IdP(active(aud=["other", "app"])), Clock(), **audience).verify(TOKEN)).ok
    refresh = IdP(active(token_type="refresh_token"))
    assert (await make(refresh, Clock(), **required()).verify(TOKEN)).reason == Reason.WRONG_TOKEN_TYPE


async def test_a_token_without_jti_gets_one_from_its_hash_so_the_denylist_refuses_it() -> None:
    idp, denied = IdP(active()), set[object]()
    verifier = make(idp, Clock(), denied=denied, **required())
    claims = (await verifier.verify(TOKEN)).claims
    assert claims is not None and claims["jti"] == f"opaque:{token_hash(TOKEN)}"
    assert await verifier.signed_claims(TOKEN) == claims
    denied.add(claims["jti"])  # logout, revoke_superseded, the end of the session family
    assert (await verifier.verify(TOKEN)).reason == Reason.TOKEN_REVOKED
    assert idp.calls == 1


async def test_near_expiry_is_refreshable_and_the_fast_path_stops_at_the_bound_or_the_margin() -> None:
    clock = Clock()
    verifier = make(IdP(active(exp=NOW + 3600)), clock, cache=60, refresh_before=30, **required())
    verdict = await verifier.verify(TOKEN)
    assert verdict.ok and not verdict.refreshable and verdict.exp == NOW + 60
    assert verdict.claims is not None
    assert verdict.exp - verifier.refresh_margin(verdict.claims, verdict.exp) == NOW + 60  # the cache bound
    short = make(IdP(active(exp=NOW + 40)), clock, cache=60, refresh_before=30, **required())
    verdict = await short.verify(TOKEN)
    assert verdict.ok and verdict.exp == NOW + 40 and verdict.claims is not None
    assert verdict.exp - short.refresh_margin(verdict.claims, verdict.exp) == NOW + 10  # exp - refresh_before
    clock.now += 15
    assert (await short.verify(TOKEN)).refreshable


async def test_tokens_that_cannot_be_sent_are_refused_without_a_call() -> None:
    idp = IdP(active())
    verifier = make(idp, Clock(), **required())
    assert (await verifier.verify("a b")).reason == Reason.MALFORMED_TOKEN
    assert (await verifier.verify("x" * 20_000)).reason == Reason.TOKEN_TOO_LARGE
    assert idp.calls == 0


async def test_cache_zero_asks_every_time() -> None:
    idp = IdP(active())
    verifier = make(idp, Clock(), cache=0, **required())
    for _ in range(3):
        verdict = await verifier.verify(TOKEN)
        assert verdict.ok and verdict.claims is not None
        assert verdict.exp - verifier.refresh_margin(verdict.claims, verdict.exp) <= NOW  # no fast path either
    assert idp.calls == 3


# --- userinfo ---------------------------------------------------------------------------------------------


async def test_userinfo_claims_come_from_a_bearer_get_and_are_cached_for_the_bound() -> None:
    idp, clock = IdP(lambda request: httpx.Response(200, json={"sub": "42", "email": "a@example.com"})), Clock()
    verifier = make(idp, clock, userinfo=True, cache=30)
    verdict = await verifier.verify(TOKEN)
    assert verdict.ok and verdict.claims is not None and verdict.claims["sub"] == "42"
    assert not verdict.refreshable and verdict.exp == NOW + 30
    request = idp.requests[0]
    assert request.method == "GET" and request.headers["authorization"] == f"Bearer {TOKEN}"
    clock.now += 29
    assert (await verifier.verify(TOKEN)).ok and idp.calls == 1
    clock.now += 1
    assert (await verifier.verify(TOKEN)).ok and idp.calls == 2


async def test_userinfo_401_is_an_expired_token_and_5xx_or_garbage_is_503() -> None:
    unauthorized = IdP(
        lambda request: httpx.Response(401, headers={"www-authenticate": 'Bearer error="invalid_token"'})
    )
    verdict = await make(unauthorized, Clock(), userinfo=True).verify(TOKEN)
    assert verdict.reason == Reason.TOKEN_EXPIRED and verdict.refreshable
    forbidden = IdP(lambda request: httpx.Response(403))
    verdict = await make(forbidden, Clock(), userinfo=True).verify(TOKEN)
    assert verdict.reason == Reason.INVALID_TOKEN and not verdict.refreshable
    for answer in (httpx.Response(502), httpx.Response(200, text="eyJhbGciOi.jwt.userinfo")):
        verdict = await make(IdP(lambda request, a=answer: a), Clock(), userinfo=True).verify(TOKEN)
        assert verdict.reason == Reason.INTROSPECTION_UNAVAILABLE


def test_build_verifier_checks_jwts_with_keys_and_opaque_tokens_at_the_idp() -> None:
    client = httpx.AsyncClient()
    jwts = TokensConfig(secret="k" * 32, algorithms=("HS256",))
    plain = build_verifier(jwts, StaticKey(b"k" * 32), lambda section: client, token_hash=token_hash)
    assert type(plain) is Verifier
    sections: list[str] = []
    opaque = build_verifier(
        TokensConfig(userinfo=UserinfoConfig(endpoint=USERINFO)),
        StaticKey(None),
        lambda section: sections.append(section) or client,  # type: ignore[func-returns-value]
        token_hash=token_hash,
    )
    assert isinstance(opaque, OpaqueVerifier) and sections == ["tokens.userinfo"]


async def test_each_call_made_is_counted_by_result_and_cached_answers_are_not() -> None:
    results: list[str] = []
    idp, clock = IdP(active()), Clock()
    introspection = IntrospectionConfig(endpoint=ENDPOINT, client_id="gateway", cache=10)
    config = TokensConfig(introspection=introspection, required_claims=("exp", "username"))
    client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
    verifier = OpaqueVerifier(
        config,
        Introspection(introspection, client),
        cache=10,
        token_hash=token_hash,
        clock=clock,
        on_call=results.append,
    )
    for _ in range(3):
        await verifier.verify(TOKEN)
    idp.answer = lambda request: httpx.Response(200, json={"active": False})
    await verifier.verify("another-token")
    idp.answer = lambda request: httpx.Response(502)
    await verifier.verify("a-third-token")
    assert results == ["active", "inactive", "error"]


async def test_a_logged_out_userinfo_token_without_exp_is_refused_at_once() -> None:
    """Regression: logout denied a token only with a numeric exp; a userinfo answer names none, so a logged-out
    token kept its 200s for as long as the IdP (and each worker's cache) said so."""
    from gateway.denylist import Denylist
    from gateway.logout import Logout
    from gateway.store import MemoryStore

    idp = IdP(lambda request: httpx.Response(200, json={"sub": "42"}))
    denylist = Denylist(MemoryStore("t:", clock=time.time))
    verifier = make(idp, Clock(time.time()), userinfo=True, cache=300, denied=denylist)
    assert (await verifier.verify(TOKEN)).ok
    logout = Logout(
        jar=cast(Any, None), verifier=verifier, denylist=denylist, refresher=None, csrf=cast(Any, None),
        origin=lambda scope: "", redirect="/",
    )  # fmt: skip
    await logout._deny(TOKEN)
    assert (await verifier.verify(TOKEN)).reason == Reason.TOKEN_REVOKED
