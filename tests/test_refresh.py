"""SessionRefresher in-process: MemoryStore, the demo IdP over ASGITransport, an injected store clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import refresh as refresh_module
from gateway.config import CookiesConfig, CookieSpec, RefreshConfig, TokensConfig
from gateway.cookies import CookieJar
from gateway.credentials import AuthResult
from gateway.demo.idp import IdentityProvider, IdPSettings, TokenPair, create_idp_app
from gateway.errors import StoreError
from gateway.idp import IdPClient
from gateway.keys import StaticKey
from gateway.metrics import Metrics
from gateway.refresh import SessionRefresher
from gateway.sealing import Sealer
from gateway.store import MemoryStore, Store
from gateway.tokens import Verifier

SECRET = IdPSettings.hs_secret
IDP = "http://idp.test"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"
GRACE = 5.0


class Clock:
    """The store's clock: expiry (grace period, failure memory, leases) advances only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    app: Any
    http: httpx.AsyncClient
    store: Store
    clock: Clock
    sealer: Sealer
    metrics: Metrics
    refresher: SessionRefresher

    @property
    def idp(self) -> IdentityProvider:
        idp: IdentityProvider = self.app.state.idp
        return idp

    def session(self, ttl: int = -60) -> TokenPair:
        """A session whose access token has already expired."""
        return self.idp.start_session("alice", ttl=ttl)

    def outcomes(self, label: str) -> float:
        return self.metrics.registry.get_sample_value("gateway_refresh_total", {"outcome": label}) or 0.0

    def hash(self, token: str) -> str:
        return self.sealer.token_hash(token)


Build = Callable[..., Harness]


@pytest.fixture
async def build() -> AsyncIterator[Build]:
    """Builds refreshers (by default on a fresh demo IdP); closes them and their clients afterwards."""
    made: list[Harness] = []

    def make(
        *,
        app: Any = None,
        store: Store | None = None,
        clock: Clock | None = None,
        cookies: CookiesConfig | None = None,
        **refresh: Any,
    ) -> Harness:
        app = app if app is not None else create_idp_app(IdPSettings())
        clock = clock or Clock()
        store = store if store is not None else MemoryStore("gw:", clock=clock)
        config = RefreshConfig(
            **{
                "endpoint": f"{IDP}/token",
                "client_id": "legacy-app",
                "client_secret": "demo-secret",
                "client_auth": "basic",
                "revocation_endpoint": f"{IDP}/revoke",
                "grace_period": GRACE,
                "timeout": 5,
                "wait_timeout": 5,
            }
            | refresh
        )
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        tokens = TokensConfig(algorithms=("HS256",), secret=SECRET, audience="legacy-app", leeway=0)
        sealer = Sealer("store-secret-for-tests")  # the same in every "process", as configured
        metrics = Metrics()
        refresher = SessionRefresher(
            config=config,
            store=store,
            sealer=sealer,
            idp=IdPClient(config, http),
            verifier=Verifier(tokens, StaticKey(SECRET.encode())),
            jar=CookieJar.from_config(cookies or CookiesConfig()),
            metrics=metrics,
        )
        harness = Harness(app, http, store, clock, sealer, metrics, refresher)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.refresher.close()
        await harness.http.aclose()


def cookies(result: AuthResult) -> dict[str, tuple[str, dict[str, str]]]:
    """Set-Cookie headers by name: (value, attributes)."""
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for header in result.set_cookies:
        first, *attributes = header.decode("latin-1").split("; ")
        name, _, value = first.partition("=")
        assert name not in found, f"two Set-Cookie headers for {name}"
        found[name] = (value, dict(a.partition("=")[::2] for a in attributes))
    return found


def assert_cleared(result: AuthResult) -> None:
    jar = cookies(result)
    assert set(jar) == {ACCESS, REFRESH}
    assert all(value == "" and attrs["Max-Age"] == "0" for value, attrs in jar.values())


def assert_refreshed(result: AuthResult, old_refresh: str) -> tuple[str, str]:
    """The request goes on with new tokens and both cookies are set; returns (access, refresh)."""
    assert result.refreshed and result.reason is None and result.claims is not None
    jar = cookies(result)
    assert set(jar) == {ACCESS, REFRESH}
    access, refresh = jar[ACCESS][0], jar[REFRESH][0]
    assert result.token == access and refresh != old_refresh
    for _, attrs in jar.values():
        assert attrs["Path"] == "/" and attrs["SameSite"] == "Lax" and "HttpOnly" in attrs and "Secure" in attrs
    return access, refresh


# --- single flight and the grace period ------------------------------------------------------------


async def test_200_concurrent_refreshes_make_one_idp_call_and_agree(build: Build) -> None:
    h = build()
    old = h.session()
    results = await asyncio.gather(*(h.refresher.refresh(old.refresh, old.access) for _ in range(200)))
    assert h.idp.counters.refresh_calls == 1
    access, refresh = assert_refreshed(results[0], old.refresh)
    assert all(r.set_cookies == results[0].set_cookies for r in results)
    assert all(r.claims == results[0].claims and r.token == access for r in results)
    assert results[0].claims is not None and results[0].claims["sub"] == "alice"
    assert jwt.decode(refresh, options={"verify_signature": False})["jti"] == old.family.current
    assert (h.outcomes("ok"), h.outcomes("grace_hit")) == (1, 0)  # one shared flight, not 200 lock waits


async def test_superseded_token_within_grace_gets_the_successor_without_an_idp_call(build: Build) -> None:
    h = build()
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    h.clock.advance(GRACE - 1)
    again = await h.refresher.refresh(old.refresh, old.access)  # a fast reload with the old cookies
    assert again.set_cookies == first.set_cookies and again.claims == first.claims
    assert h.idp.counters.refresh_calls == 1
    assert (h.outcomes("ok"), h.outcomes("grace_hit")) == (1, 1)


async def test_a_caller_that_goes_away_does_not_cancel_the_shared_idp_call(build: Build) -> None:
    h = build()
    h.idp.behaviour.latency = 0.2
    old = h.session()
    leaving = asyncio.create_task(h.refresher.refresh(old.refresh, old.access))
    staying = asyncio.create_task(h.refresher.refresh(old.refresh, old.access))
    await asyncio.sleep(0.05)
    leaving.cancel()
    result = await staying
    assert_refreshed(result, old.refresh)
    assert h.idp.counters.refresh_calls == 1 and h.idp.counters.refresh_ok == 1
    # The redeemed token's successor was stored, so the cancelled client's retry is a grace hit.
    assert (await h.refresher.refresh(old.refresh, old.access)).set_cookies == result.set_cookies
    assert h.idp.counters.refresh_calls == 1


async def test_reuse_after_grace_ends_the_session_and_revokes_the_successor(build: Build) -> None:
    h = build()
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    _, successor = assert_refreshed(first, old.refresh)
    h.clock.advance(GRACE + 1)

    reused = await h.refresher.refresh(old.refresh, old.access)
    assert reused.reason == "reuse" and reused.claims is None
    assert_cleared(reused)
    assert h.idp.counters.refresh_calls == 1  # the IdP is not asked to redeem a replayed token
    await h.refresher.close()  # the revocation runs in the background
    assert h.idp.counters.revocations == 1 and old.family.revoked
    assert h.outcomes("reuse") == 1

    # The gateway refuses the successor too, without asking the IdP.
    refused = await h.refresher.refresh(successor, None)
    assert refused.reason == "invalid_grant"
    assert_cleared(refused)
    assert h.idp.counters.refresh_calls == 1


# --- failures ---------------------------------------------------------------------------------------------


async def test_idp_failure_keeps_cookies_then_the_same_token_refreshes_fine(build: Build) -> None:
    h = build()
    old = h.session()
    h.idp.behaviour.fail = "503"
    results = await asyncio.gather(*(h.refresher.refresh(old.refresh, old.access) for _ in range(20)))
    assert all(r.reason == "idp_error" and r.set_cookies == [] and r.claims is None for r in results)
    assert h.idp.counters.refresh_calls == 1

    # Shared for FAILURE_MEMORY seconds, so a burst of retries does not stampede a struggling IdP.
    h.clock.advance(refresh_module.FAILURE_MEMORY - 0.5)
    retry = await h.refresher.refresh(old.refresh, old.access)
    assert retry.reason == "idp_error" and h.idp.counters.refresh_calls == 1

    h.idp.behaviour.fail = None
    h.clock.advance(0.6)
    assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    assert h.idp.counters.refresh_calls == 2 and h.idp.counters.refresh_ok == 1
    assert (h.outcomes("idp_error"), h.outcomes("ok")) == (2, 1)


async def test_failure_memory_is_the_module_setting(build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refresh_module, "FAILURE_MEMORY", 0.5)
    h = build()
    old = h.session()
    h.idp.behaviour.fail = "500"
    assert (await h.refresher.refresh(old.refresh, old.access)).reason == "idp_error"
    h.idp.behaviour.fail = None
    h.clock.advance(0.6)
    assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)


async def test_invalid_grant_clears_both_cookies_and_is_remembered(build: Build) -> None:
    h = build()
    old = h.session()
    old.family.revoked = True  # e.g. the user logged out elsewhere
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "invalid_grant" and result.claims is None
    assert_cleared(result)
    assert h.idp.counters.refresh_calls == 1
    assert (await h.refresher.refresh(old.refresh, old.access)).reason == "invalid_grant"
    assert h.idp.counters.refresh_calls == 1


async def test_new_access_token_that_fails_verification_sets_no_cookies(build: Build) -> None:
    h = build()
    old = h.session()
    h.idp.behaviour.fail = "bad_signature"
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "idp_bad_response" and result.set_cookies == [] and result.claims is None


async def test_abandoned_attempt_ends_the_session_without_calling_the_idp(build: Build) -> None:
    """Regression: a token a dead owner may have redeemed is never sent again (it could be reuse)."""
    h = build()
    old = h.session()
    await h.store.set(f"attempt:{{{h.hash(old.refresh)}}}", b"1", 60)
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "invalid_grant"
    assert_cleared(result)
    assert h.idp.counters.refresh_calls == 0 and h.outcomes("abandoned") == 1


class BrokenStore:
    """A MemoryStore whose ``get`` (or writes of some keys) fail as an unreachable Redis would."""

    def __init__(self, inner: MemoryStore, *, get: bool = False, set_prefix: str | None = None) -> None:
        self._inner, self._fail_get, self._fail_set = inner, get, set_prefix

    async def get(self, key: str) -> bytes | None:
        if self._fail_get:
            raise StoreError("connection refused")
        return await self._inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float, *, notify: bool = False) -> None:
        if self._fail_set is not None and key.startswith(self._fail_set):
            raise StoreError("connection reset")
        await self._inner.set(key, value, ttl, notify=notify)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_store_unavailable_answers_without_cookies_or_idp_call(build: Build) -> None:
    h = build(store=BrokenStore(MemoryStore(), get=True))
    old = h.session()
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "store_unavailable" and result.set_cookies == []
    assert h.idp.counters.refresh_calls == 0


async def test_tokens_redeemed_but_not_shareable_still_reach_the_request(build: Build) -> None:
    h = build(store=BrokenStore(MemoryStore(), set_prefix="result:"))
    old = h.session()
    assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    assert h.idp.counters.refresh_ok == 1


# --- the lock ---------------------------------------------------------------------------------------------


async def test_lock_held_by_an_owner_that_never_releases_times_out(build: Build) -> None:
    h = build(wait_timeout=0.2)
    old = h.session()
    assert await h.store.acquire(f"lock:{{{h.hash(old.refresh)}}}", "another-process", 60)
    started = time.monotonic()
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "lock_timeout" and result.set_cookies == []
    assert 0.2 <= time.monotonic() - started < 2
    assert h.idp.counters.refresh_calls == 0


async def test_lease_is_renewed_while_a_slow_idp_call_is_in_flight(build: Build) -> None:
    """Regression (oauth2-proxy PR #3456): an IdP slower than the lease still gets exactly one call."""
    store = MemoryStore("gw:")  # real monotonic clock: leases must really run out without renewal
    first = build(store=store, lock_lease=0.3)
    second = build(app=first.app, store=store, lock_lease=0.3)  # another worker process
    first.idp.behaviour.latency = 1.0
    old = first.session()
    lock = f"lock:{{{first.hash(old.refresh)}}}"
    owner = asyncio.create_task(first.refresher.refresh(old.refresh, old.access))
    for _ in range(200):
        if await store.get(lock) is not None:
            break
        await asyncio.sleep(0.005)
    waiter = asyncio.create_task(second.refresher.refresh(old.refresh, old.access))
    a, b = await asyncio.wait_for(asyncio.gather(owner, waiter), 5)
    assert first.idp.counters.refresh_calls == 1
    assert_refreshed(a, old.refresh)
    assert b.set_cookies == a.set_cookies and b.claims == a.claims
    assert (first.outcomes("ok"), second.outcomes("grace_hit")) == (1, 1)
    assert await store.get(lock) is None  # released


# --- cookies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refresh_ttl", "configured", "expected"),
    [(600, 1209600, 600), (1209600, 3600, 3600), (600, None, 600)],
)
async def test_refresh_cookie_max_age_is_the_jwt_exp_capped_by_config(
    build: Build, refresh_ttl: int, configured: int | None, expected: int
) -> None:
    config = CookiesConfig(refresh=CookieSpec(name="gw_refresh", max_age=configured))
    h = build(app=create_idp_app(IdPSettings(refresh_ttl=refresh_ttl)), cookies=config)
    old = h.session()
    result = await h.refresher.refresh(old.refresh, old.access)
    max_age = int(cookies(result)[REFRESH][1]["Max-Age"])
    assert expected - 2 <= max_age <= expected
    assert "Max-Age" not in cookies(result)[ACCESS][1]  # the access cookie lives for the browser session


class StaticIdP:
    """An IdP that never rotates: every refresh answers a fresh access token and no refresh_token."""

    def __init__(self) -> None:
        self.calls = 0

        async def token(request: Request) -> Response:
            self.calls += 1
            now = int(time.time())
            claims = {"sub": "carol", "aud": "legacy-app", "iat": now, "exp": now + 300, "n": self.calls}
            return JSONResponse({"access_token": jwt.encode(claims, SECRET, algorithm="HS256"), "expires_in": 300})

        self.app = Starlette(routes=[Route("/token", token, methods=["POST"])])


async def test_idp_that_does_not_rotate_keeps_the_refresh_token(build: Build) -> None:
    idp = StaticIdP()
    h = build(app=idp.app)
    token = "opaque-non-rotating-refresh-token"
    first = await h.refresher.refresh(token, None)
    jar = cookies(first)
    assert first.claims is not None and first.claims["sub"] == "carol"
    assert jar[REFRESH][0] == token
    assert jar[REFRESH][1]["Max-Age"] == "1209600"  # opaque: the configured lifetime
    assert await h.store.get(f"used:{{{h.hash(token)}}}") is None  # not superseded, so never "reused"
    assert (await h.refresher.refresh(token, None)).set_cookies == first.set_cookies
    assert idp.calls == 1
    h.clock.advance(GRACE + 1)
    later = await h.refresher.refresh(token, None)
    assert later.claims is not None and later.claims["n"] == 2 and cookies(later)[REFRESH][0] == token
    assert idp.calls == 2


# --- logs ------------------------------------------------------------------------------------------------


async def test_no_token_is_ever_logged(build: Build, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = build()
    seen: set[str] = set()

    def remember(*results: AuthResult) -> None:
        for result in results:
            seen.update(value for value, _ in cookies(result).values() if value)

    ok = h.session()
    seen.update((ok.refresh, ok.access))
    remember(*await asyncio.gather(*(h.refresher.refresh(ok.refresh, ok.access) for _ in range(5))))
    remember(await h.refresher.refresh(ok.refresh, ok.access))  # grace hit
    h.clock.advance(GRACE + 1)
    remember(await h.refresher.refresh(ok.refresh, ok.access))  # reuse
    await h.refresher.close()

    failing = h.session()
    seen.update((failing.refresh, failing.access))
    h.idp.behaviour.fail = "503"
    remember(await h.refresher.refresh(failing.refresh, failing.access))
    h.idp.behaviour.fail = "bad_signature"
    h.clock.advance(refresh_module.FAILURE_MEMORY + 1)
    remember(await h.refresher.refresh(failing.refresh, failing.access))
    h.idp.behaviour.fail = None
    dead = h.session()
    dead.family.revoked = True
    seen.update((dead.refresh, dead.access))
    remember(await h.refresher.refresh(dead.refresh, dead.access))

    assert len(seen) >= 8
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert not [t for t in seen if t in text]
    assert f"event=refresh_reuse token={h.hash(ok.refresh)[:12]}" in caplog.text
    for outcome in ("ok", "grace_hit", "reuse", "idp_error", "idp_bad_response", "invalid_grant"):
        assert f"outcome={outcome} " in caplog.text


async def test_grace_hit_whose_access_token_expired_carries_on_with_the_successor(build: Build) -> None:
    """Regression: access lifetime shorter than grace_period made a late grace hit a 502."""
    h = build(app=create_idp_app(IdPSettings(access_ttl=1)))
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    _, successor = assert_refreshed(first, old.refresh)
    await asyncio.sleep(1.1)  # the successor's access token (1 s) expires; the verifier uses real time
    late = await h.refresher.refresh(old.refresh, old.access)
    _, newest = assert_refreshed(late, old.refresh)
    assert newest != successor
    assert h.idp.counters.refresh_calls == 2 and h.idp.counters.reuse_detected == 0


async def test_unexpected_failure_is_503_not_500_and_keeps_cookies(build: Build) -> None:
    """Every waiter shares the flight's outcome, so a bug there must fail closed, not crash each request."""

    class Exploding(BrokenStore):
        async def get(self, key: str) -> bytes | None:
            raise RuntimeError("unexpected")

    h = build(store=Exploding(MemoryStore()))
    old = h.session()
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "refresh_error" and result.set_cookies == []
    assert h.idp.counters.refresh_calls == 0


async def test_owner_writes_landing_between_a_readers_gets_are_a_grace_hit_not_reuse(build: Build) -> None:
    """Regression (found by bench/soak.py): the reader saw no result, then the owner's used marker: 401 reuse."""
    h = build()
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)  # the real rotation, for realistic values
    key = h.hash(old.refresh)
    store = h.store
    result = await store.get(f"result:{{{key}}}")
    used = await store.get(f"used:{{{key}}}")
    assert result is not None and used is not None
    await store.delete(f"result:{{{key}}}")
    await store.delete(f"used:{{{key}}}")

    real_get = store.get
    landed = False

    async def get(name: str) -> bytes | None:
        nonlocal landed
        value = await real_get(name)
        if not landed:  # the owner's two writes land right after the reader's first read
            landed = True
            await store.set(f"result:{{{key}}}", result, 30)
            await store.set(f"used:{{{key}}}", used, 3600)
        return value

    store.get = get  # type: ignore[method-assign]
    again = await h.refresher.refresh(old.refresh, old.access)
    assert again.reason is None and again.set_cookies == first.set_cookies
    assert h.idp.counters.refresh_calls == 1
