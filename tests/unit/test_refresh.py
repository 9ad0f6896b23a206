"""SessionRefresher in-process: MemoryStore, the demo IdP over ASGITransport, an injected store clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support.waiting import until

from gateway import redemption
from gateway.authn import Authenticator, AuthResult
from gateway.config import CookiesConfig, IntrospectionConfig, RefreshConfig, RefreshCookieSpec, TokensConfig
from gateway.cookies import MAX_COOKIE_BYTES, CookieJar
from gateway.demo.idp import IdentityProvider, IdPSettings, TokenPair, create_idp_app
from gateway.denylist import Denylist
from gateway.errors import KeyFetchError, StoreError
from gateway.families import Families
from gateway.idp_client import IdPClient
from gateway.introspection import build_verifier
from gateway.keys import StaticKey
from gateway.lease import Lease
from gateway.metrics import Metrics
from gateway.refresh import SessionRefresher
from gateway.sealing import Sealer
from gateway.stalls import Stalls
from gateway.store import MemoryStore, RecordKeys, Store
from gateway.throttle import ClientThrottle
from gateway.tokens import Verifier

SECRET = IdPSettings.hs_secret
IDP = "http://idp.test"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"
GRACE = 5.0
STORE_SECRET = "store-secret-for-tests"  # the same in every "process", as configured


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
    denylist: Denylist

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
        keys: Any = None,
        throttle: ClientThrottle | None = None,
        verifier: Callable[[Denylist], Verifier] | None = None,
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
        sealer = Sealer(STORE_SECRET)
        metrics = Metrics()
        denylist = Denylist(store)
        families = Families(store, sealer, denylist, time.time, 3600)
        refresher = SessionRefresher(
            config=config,
            store=store,
            sealer=sealer,
            idp=IdPClient(config, http),
            verifier=verifier(denylist)
            if verifier
            else Verifier(tokens, keys or StaticKey(SECRET.encode()), denied=denylist),
            jar=CookieJar.from_config(cookies or CookiesConfig(), sealer),
            metrics=metrics,
            families=families,
            throttle=throttle,
            grace_clock=clock,  # a grace hit remembered here lasts as long as the store's clock says
        )
        harness = Harness(app, http, store, clock, sealer, metrics, refresher, denylist)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.refresher.close()
        await harness.http.aclose()


def cookies(result: AuthResult) -> dict[str, tuple[str, dict[str, str]]]:
    """Set-Cookie headers by name: (value, attributes); the refresh cookie's value unsealed (the token)."""
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for header in result.set_cookies:
        first, *attributes = header.decode("latin-1").split("; ")
        name, _, value = first.partition("=")
        assert name not in found, f"two Set-Cookie headers for {name}"
        if name == REFRESH and value:
            token = Sealer(STORE_SECRET).open_cookie(value, REFRESH)
            assert token is not None, "the refresh cookie must hold a token sealed by the gateway"
            value = token
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
    await until(lambda: h.idp.counters.refresh_calls == 1, "the shared call is at the IdP")  # for 0.2 s
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
    assert refused.reason == "reuse"
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
    h.clock.advance(redemption.FAILURE_MEMORY - 0.5)
    retry = await h.refresher.refresh(old.refresh, old.access)
    assert retry.reason == "idp_error" and h.idp.counters.refresh_calls == 1

    h.idp.behaviour.fail = None
    h.clock.advance(0.6)
    assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    assert h.idp.counters.refresh_calls == 2 and h.idp.counters.refresh_ok == 1
    assert (h.outcomes("idp_error"), h.outcomes("ok")) == (2, 1)


async def test_failure_memory_is_the_module_setting(build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redemption, "FAILURE_MEMORY", 0.5)
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


async def test_new_access_token_that_never_verifies_is_502_and_the_successor_is_kept(build: Build) -> None:
    """The IdP redeemed the token: its successor is the session now, even if its access token is bad."""
    h = build()
    old = h.session()
    h.idp.behaviour.fail = "bad_signature"
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "idp_bad_response" and result.claims is None
    assert set(cookies(result)) == {REFRESH}  # the rotated refresh cookie, no access cookie
    successor = jwt.decode(cookies(result)[REFRESH][0], options={"verify_signature": False})
    assert successor["jti"] == old.family.current  # the IdP's own successor
    assert h.idp.counters.refresh_ok == 1 and h.outcomes("unverified") == 1


@pytest.mark.parametrize("fail", ["oversize", "dpop", "expires_zero", "wider_scope"])
async def test_an_unusable_answer_is_a_redeemed_token_502_once_then_the_session_ends_without_a_resend(
    build: Build, fail: str
) -> None:
    """Regression (issue 14, item 14): an answer over 64 KiB, a DPoP token type, `expires_in: 0` or a scope wider than
    the expired token's was used; it is unusable, and the IdP redeemed the token: never send it again."""
    h = build()
    old = h.idp.start_session("alice", {"scope": "openid profile"}, ttl=-60)
    h.idp.behaviour.fail = fail
    first = await h.refresher.refresh(old.refresh, old.access)
    assert first.reason == "idp_bad_response" and first.claims is None and first.set_cookies == []  # 502, kept
    h.idp.behaviour.fail = None
    h.clock.advance(redemption.FAILURE_MEMORY + 1)  # the failure shared with concurrent requests is gone
    later = await h.refresher.refresh(old.refresh, old.access)
    assert later.reason == "refresh_lost"
    assert_cleared(later)
    assert h.idp.counters.refresh_calls == 1 and h.idp.counters.reuse_detected == 0


@pytest.mark.parametrize(("claims", "with_access"), [({}, True), ({"scope": "openid profile"}, False)])
async def test_the_scope_is_compared_only_with_a_replaced_token_that_names_one(
    build: Build, claims: dict[str, Any], with_access: bool
) -> None:
    """A replaced token without scope, or no replaced token at all (the access cookie is gone): nothing to compare."""
    h = build()
    old = h.idp.start_session("alice", claims, ttl=-60)
    h.idp.behaviour.fail = "wider_scope"  # answers the session's scope (or "openid") plus "admin"
    assert_refreshed(await h.refresher.refresh(old.refresh, old.access if with_access else None), old.refresh)


async def lost_attempt(h: Harness, token: str, *, state: str = "maybe", window: float = 60) -> RecordKeys:
    """What an owner leaves behind when the IdP may have redeemed ``token`` and the answer was lost."""
    keys = RecordKeys(h.hash(token), h.hash(token))
    assert await h.store.acquire(keys.lock, "dead-owner", 60)
    assert await h.store.begin_attempt(keys, "dead-owner", "fence-1", window, 3600) is not None
    if state == "maybe":
        assert await h.store.settle_attempt(keys, "fence-1", "maybe")
    assert await h.store.release(keys.lock, "dead-owner")
    return keys


async def test_a_lost_answer_ends_the_session_cleanly_without_calling_the_idp(build: Build, caplog: Any) -> None:
    """Regression: a token the IdP may have redeemed is never sent again (it would be reuse: the family dies)."""
    h = build()
    old = h.session()
    await lost_attempt(h, old.refresh)
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "refresh_lost"
    assert_cleared(result)
    assert h.idp.counters.refresh_calls == 0 and h.outcomes("refresh_lost") == 1
    assert f"event=refresh_lost token={h.hash(old.refresh)[:12]}" in caplog.text
    assert (await h.refresher.refresh(old.refresh, old.access)).reason == "refresh_lost"  # and stays ended
    assert h.idp.counters.refresh_calls == 0


async def test_an_attempt_whose_owner_is_still_within_its_deadline_is_waited_for(build: Build) -> None:
    """A pending attempt is somebody's IdP call in flight: never ended, never duplicated; its result is shared."""
    h = build()
    old = h.session()
    keys = RecordKeys(h.hash(old.refresh), h.hash(old.refresh))
    owner = build(app=h.app, store=h.store, clock=h.clock)  # another worker, same store
    assert await h.store.acquire(keys.lock, "slow-owner", 60)
    waiting = asyncio.create_task(h.refresher.refresh(old.refresh, old.access))
    await asyncio.sleep(0.3)  # a negative check: it keeps waiting (and calls nobody) while the owner holds on
    assert not waiting.done() and h.idp.counters.refresh_calls == 0
    await h.store.release(keys.lock, "slow-owner")  # the owner gave up before sending: nothing recorded
    done = await asyncio.wait_for(waiting, 5)
    assert_refreshed(done, old.refresh)
    assert h.idp.counters.refresh_calls == 1
    assert (await owner.refresher.refresh(old.refresh, old.access)).set_cookies == done.set_cookies
    assert h.idp.counters.refresh_calls == 1


class BrokenStore:
    """A MemoryStore whose reads, or the named operations, fail as an unreachable Redis would (``failing`` times)."""

    def __init__(
        self, inner: MemoryStore, *, get: bool = False, fail: tuple[str, ...] = (), failing: int = 10**9
    ) -> None:
        self._inner, self._fail_get, self._fail, self.failing = inner, get, fail, failing

    def _maybe_fail(self, operation: str) -> None:
        if operation in self._fail and self.failing > 0:
            self.failing -= 1
            raise StoreError(f"{operation}: connection reset")

    async def get(self, key: str) -> bytes | None:
        if self._fail_get:
            raise StoreError("connection refused")
        return await self._inner.get(key)

    async def read_record(self, keys: RecordKeys) -> Any:
        if self._fail_get:
            raise StoreError("connection refused")
        return await self._inner.read_record(keys)

    async def finish(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("finish")
        return await self._inner.finish(*args, **kwargs)

    async def settle_attempt(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("settle_attempt")
        return await self._inner.settle_attempt(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_store_unavailable_answers_without_cookies_or_idp_call(build: Build) -> None:
    h = build(store=BrokenStore(MemoryStore(), get=True))
    old = h.session()
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "store_unavailable" and result.set_cookies == []
    assert h.idp.counters.refresh_calls == 0


async def test_tokens_redeemed_but_not_recorded_still_reach_the_request_and_are_recorded_later(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IdP has redeemed the token: a store outage during the write-out must not lose the successor."""
    monkeypatch.setattr(redemption, "SHARE_RETRY", 0.3)
    store = BrokenStore(MemoryStore("gw:"), fail=("finish",))
    h = build(store=store)
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    assert_refreshed(first, old.refresh)
    assert h.idp.counters.refresh_ok == 1
    store.failing = 0  # the store is back: the write-out, still retried in the background, lands
    await h.refresher.close()
    again = await h.refresher.refresh(old.refresh, old.access)
    assert again.set_cookies == first.set_cookies and h.idp.counters.refresh_calls == 1


async def test_an_attempt_that_never_reached_the_idp_is_cleared_even_through_a_store_failure(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 12, failure 1): IdP down and Redis failing at once must not become a logout later."""
    clock = Clock()
    store = BrokenStore(MemoryStore("gw:", clock=clock), fail=("settle_attempt",), failing=3)
    h = build(store=store, clock=clock)
    old = h.session()
    h.idp.behaviour.fail = "503"
    down = await h.refresher.refresh(old.refresh, old.access)
    assert down.reason == "idp_error" and down.set_cookies == []
    await h.refresher.close()  # the clearing goes on in the background until the store answers
    assert store.failing == 0
    h.idp.behaviour.fail = None
    h.clock.advance(redemption.FAILURE_MEMORY + 1)
    assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    assert h.idp.counters.refresh_calls == 2 and h.idp.counters.refresh_ok == 1


# --- the lock ---------------------------------------------------------------------------------------------


async def test_lock_held_by_an_owner_that_never_releases_times_out(build: Build) -> None:
    h = build(wait_timeout=0.2)
    old = h.session()
    assert await h.store.acquire(RecordKeys(h.hash(old.refresh), h.hash(old.refresh)).lock, "another-process", 60)
    started = time.monotonic()
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "lock_timeout" and result.set_cookies == []
    assert 0.2 <= time.monotonic() - started < 2
    assert h.idp.counters.refresh_calls == 0


async def test_lease_is_renewed_while_a_slow_idp_call_is_in_flight(build: Build) -> None:
    """Regression (oauth2-proxy PR #3456): an IdP slower than the lease still gets exactly one call."""
    store = MemoryStore("gw:")  # real monotonic clock: leases must really run out without renewal
    first = build(store=store, lock_lease=0.3, grace_period=1)
    second = build(app=first.app, store=store, lock_lease=0.3, grace_period=1)  # another worker process
    first.idp.behaviour.latency = 1.0
    old = first.session()
    lock = RecordKeys(first.hash(old.refresh), first.hash(old.refresh)).lock
    owner = asyncio.create_task(first.refresher.refresh(old.refresh, old.access))
    holders: list[str | None] = []
    for _ in range(200):
        if await store.holder(lock) is not None:
            break
        await asyncio.sleep(0.005)
    taken = time.monotonic()
    waiter = asyncio.create_task(second.refresher.refresh(old.refresh, old.access))
    for wait in (0.45, 0.75):  # past one lease, then past two: held only if renewed
        await asyncio.sleep(taken + wait - time.monotonic())
        holders.append(await store.holder(lock))
    a, b = await asyncio.wait_for(asyncio.gather(owner, waiter), 5)
    assert holders[0] is not None and holders == [holders[0]] * 2, holders  # the same owner all along
    assert first.idp.counters.refresh_calls == 1
    assert_refreshed(a, old.refresh)
    assert b.set_cookies == a.set_cookies and b.claims == a.claims
    assert (first.outcomes("ok"), second.outcomes("grace_hit")) == (1, 1)
    assert await store.holder(lock) is None  # released


class StallingStore(BrokenStore):
    """Renewals that hang (a slow Redis reply) the first ``stalls`` times."""

    def __init__(self, inner: MemoryStore, stalls: int) -> None:
        super().__init__(inner)
        self.stalls = stalls

    async def renew(self, key: str, owner: str, lease: float) -> bool:
        if self.stalls > 0:
            self.stalls -= 1
            await asyncio.sleep(60)
        return await self._inner.renew(key, owner, lease)


async def test_a_stalled_renewal_is_retried_at_once_and_the_lease_never_lapses() -> None:
    """Regression (failure 2): one slow renewal pushed the next past the lease; the owner stopped renewing."""
    store = StallingStore(MemoryStore("gw:"), stalls=2)
    assert await store.acquire("lock:{h}", "me", 0.4)
    lease = Lease(store, "lock:{h}", "me", 0.4).start()  # type: ignore[arg-type]
    seen = []
    for _ in range(8):  # 1.6 s: four leases
        await asyncio.sleep(0.2)
        seen.append(await store.holder("lock:{h}"))
    await lease.release()
    assert store.stalls == 0 and seen == ["me"] * 8 and not lease.lost
    assert await store.holder("lock:{h}") is None


async def test_a_lease_that_expired_is_taken_back_unless_another_owner_holds_it() -> None:
    store = MemoryStore("gw:")
    assert await store.acquire("lock:{h}", "me", 0.2)
    await store.release("lock:{h}", "me")  # as if it had expired
    lease = Lease(store, "lock:{h}", "me", 0.2).start()
    await asyncio.sleep(0.15)
    assert await store.holder("lock:{h}") == "me" and not lease.lost  # nobody had it: taken back
    await store.release("lock:{h}", "me")
    assert await store.acquire("lock:{h}", "other", 5)
    await asyncio.sleep(0.15)
    assert lease.lost and await store.holder("lock:{h}") == "other"  # never stolen back
    await lease.release()
    assert await store.holder("lock:{h}") == "other"


# --- cookies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refresh_ttl", "configured", "expected"),
    [(600, 1209600, 600), (1209600, 3600, 3600), (600, None, 600)],
)
async def test_refresh_cookie_max_age_is_the_jwt_exp_capped_by_config(
    build: Build, refresh_ttl: int, configured: int | None, expected: int
) -> None:
    config = CookiesConfig(refresh=RefreshCookieSpec(name="gw_refresh", max_age=configured))
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
    h.clock.advance(redemption.FAILURE_MEMORY + 1)
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
    for outcome in ("ok", "grace_hit", "reuse", "idp_error", "unverified", "invalid_grant"):
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


async def test_a_grace_hit_carried_on_with_the_successor_is_not_kept_past_the_old_tokens_grace(build: Build) -> None:
    """Review of dc26aa4: the old token's grace hit, carried on with a successor the refresher remembers, must not
    hand admission that successor's (later) grace end: the old pair of cookies would skip reuse detection."""
    h = build(app=create_idp_app(IdPSettings(access_ttl=1)))
    old = h.session()
    assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)  # R1 -> R2, R1's grace: 5 s
    await asyncio.sleep(1.1)  # the successor's access token expires (real time)
    h.clock.advance(GRACE - 1)  # 1 s of R1's grace left; R2 rotated now gets a grace of 5 s
    for _ in range(3):  # R2 rotated, R2's grace hit from the store, R2's grace hit from memory
        result = await h.refresher.refresh(old.refresh, old.access)
        assert_refreshed(result, old.refresh)
    assert result.until is None or result.until <= time.time() + 1.0


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


async def test_an_owner_that_finished_between_a_waiters_read_and_its_acquire_is_not_called_twice(build: Build) -> None:
    """The owner's second look after acquiring: with an IdP that does not rotate, nothing else stops a 2nd call."""
    idp = StaticIdP()
    h = build(app=idp.app)
    other = build(app=idp.app, store=h.store, clock=h.clock)  # another worker
    token = "opaque-non-rotating-refresh-token"
    real_acquire = h.store.acquire
    raced = False

    async def acquire(key: str, owner: str, lease: float) -> bool:
        nonlocal raced
        if not raced:  # between this worker's read (nothing there) and its acquire, the other finishes
            raced = True
            await other.refresher.refresh(token, None)
        return await real_acquire(key, owner, lease)

    h.store.acquire = acquire  # type: ignore[method-assign]
    result = await h.refresher.refresh(token, None)
    assert raced and idp.calls == 1
    assert result.claims is not None and result.claims["n"] == 1
    assert h.outcomes("grace_hit") == 1


# --- session continuity under faults (issue 12) -------------------------------------------------------


class FlakyKeys:
    """A key source that cannot produce the key while ``down``: a kid not published yet (``unknown``), or
    not in the cached keys while the JWKS cannot be fetched (``unreachable``: KeyFetchError)."""

    def __init__(self, how: str = "unknown") -> None:
        self.down = False
        self.how = how

    async def key_for(self, kid: str | None, alg: str) -> Any:
        if self.down and self.how == "unreachable":
            raise KeyFetchError("jwks down")
        return None if self.down else SECRET.encode()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def on_change(self, listener: Callable[[], None]) -> None:
        return None


@pytest.mark.parametrize("how", ["unknown", "unreachable"])
async def test_a_successor_whose_access_token_cannot_be_verified_yet_is_kept_and_verified_later(
    build: Build, how: str
) -> None:
    """Regression (failure 6): a key rollover with JWKS down threw the valid successor away and ended the session."""
    keys = FlakyKeys(how)
    h = build(keys=keys)
    old = h.session()
    keys.down = True
    first = await h.refresher.refresh(old.refresh, old.access)
    assert first.reason == "idp_token_unverified" and first.claims is None  # 503, a transient failure
    assert set(cookies(first)) == {REFRESH}
    successor = cookies(first)[REFRESH][0]
    assert jwt.decode(successor, options={"verify_signature": False})["jti"] == old.family.current
    # Still down: the same answer again, for the old cookie and for the successor, with no new IdP call.
    assert (await h.refresher.refresh(old.refresh, old.access)).reason == "idp_token_unverified"
    assert (await h.refresher.refresh(successor, None)).reason == "idp_token_unverified"
    keys.down = False  # JWKS answers again
    recovered = await h.refresher.refresh(successor, None)
    assert recovered.claims is not None and recovered.claims["sub"] == "alice"
    assert cookies(recovered)[REFRESH][0] == successor and ACCESS in cookies(recovered)
    assert h.idp.counters.refresh_calls == 1 and h.idp.counters.reuse_detected == 0


class KeysDownAt(FlakyKeys):
    """A JWKS that cannot be fetched for the key lookups numbered in ``down`` (1 = this worker's first) only."""

    def __init__(self, *down: int) -> None:
        super().__init__("unreachable")
        self.calls, self.failing = 0, set(down)

    async def key_for(self, kid: str | None, alg: str) -> Any:
        self.calls += 1
        if self.calls in self.failing:
            raise KeyFetchError("jwks down")
        return SECRET.encode()


async def test_a_successor_that_verifies_only_on_a_second_look_is_counted_before_it_is_handed_out(
    build: Build,
) -> None:
    """Regression (I3): the write-out could not verify the new access token (not counted in the family), the
    answer's own look a moment later could, and handed it out: a logout with another tab's cookie, reuse or a
    back-channel logout ended the family and left that access token working until its exp."""
    h = build(keys=KeysDownAt(2))  # 1: the replaced token's scope, 2: the write-out's look
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    successor = cookies(first)[REFRESH][0]
    handed = first if first.claims is not None else await h.refresher.refresh(successor, None)
    assert handed.claims is not None and h.idp.counters.refresh_calls == 1
    await h.refresher.end_session(old.refresh)  # a logout with the old cookie (another tab): the family ends
    assert handed.claims["jti"] in h.denylist


async def test_a_waiter_hands_out_a_successor_verified_late_only_once_it_counted_it(build: Build) -> None:
    """Regression (I3): another worker's look at an unverified result failed (nothing counted), its answer's look
    passed, and it handed the access token out, uncounted; the family's end left it working."""
    one = build(keys=KeysDownAt(2, 3))  # the owner never verifies it
    old = one.session()
    assert (await one.refresher.refresh(old.refresh, old.access)).reason == "idp_token_unverified"
    two = build(app=one.app, store=one.store, clock=one.clock, keys=KeysDownAt(2))  # 2: the waiter's count
    answer = await two.refresher.refresh(old.refresh, old.access)  # within grace, from the result
    await two.refresher.end_session(old.refresh)
    assert answer.claims is None or answer.claims["jti"] in two.denylist
    assert answer.reason == "idp_token_unverified" and REFRESH in cookies(answer)  # 503, the successor kept


@pytest.mark.parametrize("where", ["issued", "grace"])
async def test_a_socket_opened_with_a_successor_verified_late_closes_when_its_session_ends(
    build: Build, where: str
) -> None:
    """Regression (I3): a successor's access token verified late (``issued``, or a grace hit on the old token) was
    counted in ``members`` but not linked to its family (``member:``): a WebSocket opened with it watched only its
    own logout, and stayed open through a back-channel logout, reuse, or a logout with another tab's cookie."""
    keys = FlakyKeys("unreachable")
    h = build(keys=keys)
    old = h.session()
    keys.down = True
    successor = cookies(await h.refresher.refresh(old.refresh, old.access))[REFRESH][0]
    keys.down = False
    if where == "issued":
        late = await h.refresher.refresh(successor, None)
    else:
        late = await build(app=h.app, store=h.store, clock=h.clock).refresher.refresh(old.refresh, old.access)
    assert late.claims is not None
    families = Families(h.store, h.sealer, h.denylist, time.time, 3600)
    watch = await families.watch_keys(late.claims)  # what the tunnel's watchdog checks (gateway/tunnel.py)
    await h.refresher.end_session(old.refresh)  # a logout with the old cookie: the session ends
    assert any(key in h.denylist for key in watch)


async def test_reuse_of_any_ancestor_ends_the_whole_family(build: Build) -> None:
    """Regression (failure 3): R0 -> R1 -> R2, then R0 replayed: R2 and its access token are refused too."""
    h = build()
    old = h.session()
    _, r1 = assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    h.clock.advance(GRACE + 1)
    second = await h.refresher.refresh(r1, None)
    a2, r2 = assert_refreshed(second, r1)
    h.clock.advance(GRACE + 1)
    assert h.idp.counters.refresh_calls == 2

    replay = await h.refresher.refresh(old.refresh, None)  # the thief's copy of R0
    assert replay.reason == "reuse"
    assert_cleared(replay)
    # The newest tokens die with it, at the gateway, whatever the IdP does with revocation.
    assert (await h.refresher.refresh(r2, None)).reason == "reuse"
    assert (await h.refresher.refresh(r1, None)).reason == "reuse"
    assert second.claims is not None and second.claims["jti"] in h.denylist
    verdict = await Verifier(
        TokensConfig(algorithms=("HS256",), secret=SECRET, audience="legacy-app", leeway=0),
        StaticKey(SECRET.encode()),
        denied=h.denylist,
    ).verify(a2)
    assert verdict.reason == "token_revoked"
    assert h.idp.counters.refresh_calls == 2  # nothing more reached the IdP


class LostEndReply(MemoryStore):
    """``end_family`` runs, then its reply is lost once (a timeout, a reset after the script ran)."""

    lost = 1

    async def end_family(self, keys: RecordKeys, reason: str, ttl: float, now: float) -> Any:
        end = await super().end_family(keys, reason, ttl, now)
        if self.lost:
            self.lost -= 1
            raise StoreError("reply lost")
        return end


async def test_reuse_whose_end_reply_was_lost_still_refuses_the_familys_access_tokens(build: Build) -> None:
    """Regression (I3): reuse detection ended the family in the store but the reply was lost (503): its live
    access tokens were never denylisted, and every later request found the family ended and denied nothing."""
    clock = Clock()
    h = build(store=LostEndReply("gw:", clock=clock), clock=clock)
    old = h.session()
    newest = await h.refresher.refresh(old.refresh, old.access)
    assert newest.claims is not None
    h.clock.advance(GRACE + 1)
    assert (await h.refresher.refresh(old.refresh, None)).reason == "store_unavailable"  # the reply lost: 503
    assert (await h.refresher.refresh(old.refresh, None)).reason == "reuse"
    await until(lambda: newest.claims is not None and newest.claims["jti"] in h.denylist, "the newest token refused")


async def test_reuse_whose_end_reply_was_lost_still_revokes_the_newest_token_at_the_idp(build: Build) -> None:
    """Regression: the end retried in the background refused the family's tokens at the gateway, but the newest
    refresh token, which reuse detection revokes at the IdP (whoever holds it, a thief included), never was."""
    clock = Clock()
    h = build(store=LostEndReply("gw:", clock=clock), clock=clock)
    old = h.session()
    assert (await h.refresher.refresh(old.refresh, old.access)).claims is not None
    h.clock.advance(GRACE + 1)
    assert (await h.refresher.refresh(old.refresh, None)).reason == "store_unavailable"  # the reply lost: 503
    await until(lambda: h.idp.counters.revocations == 1, "the newest refresh token revoked at the IdP")


class RefusedEnd(MemoryStore):
    """Reads answer, ``end_family`` is refused while ``refusing`` (a Redis out of memory refusing writes, a
    read-only replica after a failover)."""

    refusing = True
    ends = 0

    async def end_family(self, keys: RecordKeys, reason: str, ttl: float, now: float) -> Any:
        self.ends += 1
        if self.refusing:
            raise StoreError("OOM command not allowed")
        return await super().end_family(keys, reason, ttl, now)


async def test_requests_that_meet_a_refused_end_share_one_background_retry(build: Build) -> None:
    """Regression: each request that met a refused end (reuse, refresh_lost, invalid_grant) started a retry of its
    own, each asking the store four times a second for five minutes: a client retrying its 503s piled them up."""
    clock = Clock()
    store = RefusedEnd("gw:", clock=clock)
    h = build(store=store, clock=clock)
    old = h.session()
    newest = await h.refresher.refresh(old.refresh, old.access)
    assert newest.claims is not None
    h.clock.advance(GRACE + 1)
    for _ in range(20):
        assert (await h.refresher.refresh(old.refresh, None)).reason == "store_unavailable"
    before = store.ends
    await asyncio.sleep(1.0)
    assert store.ends - before <= 5  # one retry every RETRY_PAUSE, not one per request
    store.refusing = False
    await until(lambda: newest.claims is not None and newest.claims["jti"] in h.denylist, "the newest token refused")
    assert (await h.refresher.refresh(old.refresh, None)).reason == "reuse"


async def test_a_logout_during_a_refresh_is_not_undone_by_the_owners_write_out(build: Build) -> None:
    """Regression (failure 4): the owner's write-out restored the result, and the successor kept working."""
    h = build(revocation_endpoint=None)  # the IdP would redeem all the same (revocation ignored or not offered)
    h.idp.behaviour.latency = 0.3
    old = h.session()
    flight = asyncio.create_task(h.refresher.refresh(old.refresh, old.access))
    await until(lambda: h.idp.counters.refresh_calls == 1, "the owner is at the IdP")  # for 0.3 s
    await h.refresher.end_session(old.refresh)
    ended = await flight
    assert ended.reason == "session_ended" and ended.claims is None
    assert_cleared(ended)
    # Within grace, with the old cookie: still over (failure 10: not a grace hit, not a 502).
    again = await h.refresher.refresh(old.refresh, old.access)
    assert again.reason == "session_ended"
    assert_cleared(again)
    assert h.idp.counters.refresh_ok == 1


async def test_the_superseded_cookie_after_logout_is_401_not_a_grace_hit(build: Build) -> None:
    """Regression (failure 10): the grace hit handed back the denylisted successor as a 502, cookies kept."""
    h = build()
    old = h.session()
    _, successor = assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    await h.refresher.end_session(successor)  # logout with the new cookies
    late_tab = await h.refresher.refresh(old.refresh, old.access)  # another tab, old cookies, within grace
    assert late_tab.reason == "session_ended"
    assert_cleared(late_tab)


async def test_a_grace_hit_is_answered_by_the_worker_itself_until_the_grace_period_ends(build: Build) -> None:
    """The old cookie again (a page's parallel requests, a client slow to take the new cookies): after one
    grace hit from the store, the worker answers it alone, the store gone or not, until grace runs out."""
    clock = Clock()
    store = BrokenStore(MemoryStore("gw:", clock=clock))
    h = build(store=store, clock=clock)
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    clock.advance(1)
    assert (await h.refresher.refresh(old.refresh, old.access)).set_cookies == first.set_cookies  # from the store
    store._fail_get = True  # every read now fails: what follows is the worker's own
    for _ in range(3):
        again = await h.refresher.refresh(old.refresh, old.access)
        assert again.set_cookies == first.set_cookies and again.claims == first.claims and again.refreshed
    assert (h.outcomes("ok"), h.outcomes("grace_hit")) == (1, 4)
    store._fail_get = False
    clock.advance(GRACE)  # the grace period is over: the store decides, and it is reuse
    late = await h.refresher.refresh(old.refresh, old.access)
    assert late.reason == "reuse"
    assert_cleared(late)
    assert h.idp.counters.refresh_calls == 1


async def test_a_remembered_grace_hit_is_not_served_once_the_session_is_ended(build: Build) -> None:
    h = build()
    old = h.session()
    _, successor = assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    assert (await h.refresher.refresh(old.refresh, old.access)).claims is not None  # remembered
    await h.refresher.end_session(successor)  # logout with the new cookies: the successor is denylisted
    late_tab = await h.refresher.refresh(old.refresh, old.access)
    assert late_tab.reason == "session_ended"
    assert_cleared(late_tab)


async def test_a_sealed_value_copied_to_another_sessions_key_does_not_hand_over_its_tokens(build: Build) -> None:
    """Regression (I4): someone who can write to Redis but lacks the secret moves Alice's result to Bob's key."""
    h = build()
    alice, bob = h.session(), h.idp.start_session("bob", ttl=-60)
    await h.refresher.refresh(alice.refresh, alice.access)
    alice_keys = RecordKeys(h.hash(alice.refresh), h.hash(alice.refresh))
    bob_keys = RecordKeys(h.hash(bob.refresh), h.hash(bob.refresh))
    stolen = await h.store.get(alice_keys.result)
    assert stolen is not None
    await h.store.set(bob_keys.result, stolen, 30)
    result = await h.refresher.refresh(bob.refresh, bob.access)
    assert result.claims is None and result.reason == "store_unavailable"
    assert not any("alice" in c.decode() for c in result.set_cookies)


async def test_a_request_held_up_in_a_stalled_worker_is_not_taken_for_a_replay(build: Build) -> None:
    """A worker paused (SIGSTOP, a VM pause) past the grace period: its in-flight request is still legit."""
    h = build()
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    h.clock.advance(GRACE + 1)  # the store's clock moved on while this worker stood still...
    h.refresher._stalls.note(time.monotonic(), GRACE + 1)  # ...which its ticker noticed
    late = await h.refresher.refresh(old.refresh, old.access)
    assert late.reason is None and late.claims is not None
    # The result had expired, so it carried on with the successor: redeemed once, no reuse anywhere.
    assert cookies(late)[REFRESH][0] != cookies(first)[REFRESH][0] and h.idp.counters.refresh_ok == 2
    assert h.idp.counters.reuse_detected == 0 and h.outcomes("reuse") == 0


async def test_without_a_stall_the_same_late_request_is_reuse(build: Build) -> None:
    h = build()
    old = h.session()
    await h.refresher.refresh(old.refresh, old.access)
    h.clock.advance(GRACE + 1)
    assert (await h.refresher.refresh(old.refresh, old.access)).reason == "reuse"


async def test_the_stall_ticker_notices_a_blocked_loop() -> None:
    stalls = Stalls()
    stalls.start()
    await asyncio.sleep(0.15)
    since = time.monotonic()
    time.sleep(0.8)  # the event loop stands still, as under SIGSTOP
    await asyncio.sleep(0.15)
    await stalls.close()
    assert 0.5 < stalls.credit(since) < 1.0
    assert stalls.credit(time.monotonic() + 5) == 0  # long ago from a later flight's view


async def test_releasing_a_lease_never_hangs_even_if_its_renewal_swallows_the_cancellation() -> None:
    """Regression (fault campaign): a cancellation swallowed inside redis-py (asyncio.wait_for on 3.11)
    left the renewals running for ever, and the request waiting on them hung."""
    block = asyncio.Event()

    class Swallowing(BrokenStore):
        renewing = swallowed = False

        async def renew(self, key: str, owner: str, lease: float) -> bool:
            self.renewing = True
            while not block.is_set():
                try:
                    await block.wait()
                except asyncio.CancelledError:
                    self.swallowed = True  # the reply lands with the cancellation: the cancellation is lost
            return await self._inner.renew(key, owner, lease)

    store = Swallowing(MemoryStore("gw:"))
    assert await store.acquire("lock:{h}", "me", 5)
    lease = Lease(store, "lock:{h}", "me", 5).start()  # type: ignore[arg-type]
    while not store.renewing:
        await asyncio.sleep(0.05)
    releasing = asyncio.create_task(lease.release())
    await until(lambda: store.swallowed, "the release cancelled the renewal, which swallowed it")
    block.set()
    await asyncio.wait_for(releasing, 3)
    assert await store.holder("lock:{h}") is None
    await asyncio.sleep(1.5)  # past the next renewal time: nothing renews it
    assert await store.holder("lock:{h}") is None


async def test_a_late_write_out_that_finds_the_session_ended_refuses_what_it_handed_out(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: the request already has its tokens when the store comes back; if a logout came
    first, the access token it was given must die with the session."""
    monkeypatch.setattr(redemption, "SHARE_RETRY", 0.3)
    store = BrokenStore(MemoryStore("gw:"), fail=("finish",))
    h = build(store=store)
    old = h.session()
    first = await h.refresher.refresh(old.refresh, old.access)
    assert first.claims is not None and first.claims["jti"] not in h.denylist
    await h.refresher.end_session(old.refresh)  # logout, recorded while the write-out still fails
    store.failing = 0
    await h.refresher.close()  # the background write-out lands: "ended"
    assert first.claims["jti"] in h.denylist


# --- raw refresh cookies: never-seen tokens per client (issue 14, item 10) ------------------------------


def footprint(store: Store) -> int:
    """How many keys, set members, attempts and rotations a MemoryStore holds."""
    assert isinstance(store, MemoryStore)
    return len(store._data) + sum(map(len, store._sets.values())) + len(store._attempts) + len(store._used)


async def test_never_seen_tokens_are_limited_per_client_and_then_cost_nothing(build: Build) -> None:
    """Regression (issue 14, item 10): every junk refresh token was one IdP call and 14-day store keys."""
    h = build(throttle=ClientThrottle(burst=3))
    for n in range(3):
        result = await h.refresher.refresh(f"junk-{n}", None, client="198.51.100.7")
        assert result.reason == "invalid_grant"
    assert h.idp.counters.refresh_calls == 3
    before = footprint(h.store)
    for n in range(3, 20):
        result = await h.refresher.refresh(f"junk-{n}", None, client="198.51.100.7")
        assert result.reason == "refresh_rate_limited" and result.set_cookies == []  # cookies kept: 429
    assert h.idp.counters.refresh_calls == 3 and footprint(h.store) == before
    assert h.outcomes("refresh_rate_limited") == 17
    other = await h.refresher.refresh("junk-other", None, client="198.51.100.8")  # another client has its own
    assert other.reason == "invalid_grant" and h.idp.counters.refresh_calls == 4


async def test_tokens_the_gateway_handed_out_are_never_limited(build: Build) -> None:
    h = build(throttle=ClientThrottle(burst=1))
    assert (await h.refresher.refresh("junk", None, client="198.51.100.7")).reason == "invalid_grant"
    old = h.session()
    families = Families(h.store, h.sealer, h.denylist, time.time, 3600)
    claims = jwt.decode(old.access, options={"verify_signature": False})
    await families.started(claims, old.refresh, 3600)  # a login the gateway saw (capture, OIDC)
    assert await families.lookup(h.hash(old.refresh)) == (h.hash(old.refresh), True)
    first = await h.refresher.refresh(old.refresh, old.access, client="198.51.100.7")
    _, successor = assert_refreshed(first, old.refresh)
    second = await h.refresher.refresh(successor, None, client="198.51.100.7")  # a rotated one: known too
    assert_refreshed(second, successor)
    assert h.idp.counters.refresh_calls == 3


async def test_a_logout_with_a_never_seen_token_over_the_limit_does_nothing(build: Build) -> None:
    h = build(throttle=ClientThrottle(burst=1))
    assert await h.refresher.end_session("junk-1", "198.51.100.7") is None
    before, revocations = footprint(h.store), h.idp.counters.revocations
    assert await h.refresher.end_session("junk-2", "198.51.100.7") == "refresh_rate_limited"
    assert footprint(h.store) == before and h.idp.counters.revocations == revocations


async def test_without_a_throttle_nothing_is_limited(build: Build) -> None:
    h = build()
    for n in range(15):
        assert (await h.refresher.refresh(f"junk-{n}", None, client="198.51.100.7")).reason == "invalid_grant"


# --- big tokens in cookies (issue 16, item 2) ----------------------------------------------------------


def big_cookie_path(h: Harness) -> tuple[Authenticator, CookieJar]:
    """The request path's side of a refresh: the Authenticator over the harness's refresher, and its jar."""
    jar = CookieJar.from_config(CookiesConfig(), h.sealer)
    verifier = Verifier(TokensConfig(algorithms=("HS256",), secret=SECRET, audience="legacy-app", leeway=0),
                        StaticKey(SECRET.encode()))  # fmt: skip
    return Authenticator(verifier, jar, h.refresher), jar


def sent_back(set_cookies: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The Cookie header a browser sends after these Set-Cookie values."""
    kept = [c.split(b";", 1)[0] for c in set_cookies if b"Max-Age=0" not in c]
    return [(b"cookie", b"; ".join(kept))]


async def test_big_access_tokens_refresh_into_numbered_cookies_under_the_browser_limit(build: Build) -> None:
    # Access tokens issued 5 s from expiry (refreshed 10 s before): every request refreshes, the tokens grow and shrink.
    h = build(app=create_idp_app(IdPSettings(access_ttl=20)))
    auth, jar = big_cookie_path(h)
    h.idp.behaviour.clock_skew = -15
    h.idp.behaviour.groups = 128  # about 7 KB of access token
    pair = h.session()
    browser = sent_back(jar.expand([jar.set_access(pair.access), jar.set_refresh(pair.refresh)], []))
    first = await auth.authenticate(browser)
    assert first.refreshed and first.claims is not None and first.claims["sub"] == "alice"
    assert [c.split(b"=", 1)[0] for c in first.set_cookies] == [
        ACCESS.encode() + b"_0",
        ACCESS.encode() + b"_1",
        REFRESH.encode(),
    ]
    assert all(len(c) < MAX_COOKIE_BYTES for c in first.set_cookies)
    assert 7000 < len(first.token or "") == len(jar.read(sent_back(first.set_cookies))[0] or "")
    # The browser's chunks are joined: the next refresh redeems the successor, and the tokens shrink back.
    h.idp.behaviour.groups = 0
    second = await auth.authenticate(sent_back(first.set_cookies))
    assert second.refreshed and h.idp.counters.refresh_calls == 2 and h.idp.counters.reuse_detected == 0
    set_names = sorted(c.split(b"=", 1)[0].decode() for c in second.set_cookies if b"Max-Age=0" not in c)
    gone = sorted(c.split(b"=", 1)[0].decode() for c in second.set_cookies if b"Max-Age=0" in c)
    assert set_names == [ACCESS, REFRESH] and gone == [ACCESS + "_0", ACCESS + "_1"]
    assert jar.read(sent_back(second.set_cookies))[0] == second.token


async def test_tokens_past_cookies_max_total_end_the_session_with_cookie_too_large(
    build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    h = build()
    auth, jar = big_cookie_path(h)
    h.idp.behaviour.groups = 300  # about 16 KB: past the default 12288
    pair = h.session()
    with caplog.at_level(logging.ERROR, logger="gateway.refresh"):
        result = await auth.authenticate([(b"cookie", jar.set_refresh(pair.refresh).split(b";", 1)[0])])
    assert result.reason == "cookie_too_large" and result.claims is None
    assert sorted(c.split(b"=", 1)[0] for c in result.set_cookies) == [ACCESS.encode(), REFRESH.encode()]
    assert all(b"Max-Age=0" in c for c in result.set_cookies)
    assert "do not fit in cookies (cookies.max_total: 12288); use session: {mode: server}" in caplog.text


# --- opaque access tokens: the successor's access token is checked at the introspection endpoint ---


class Introspection:
    """An RFC 7662 endpoint on httpx.MockTransport: every token active (or the endpoint down), calls counted."""

    def __init__(self) -> None:
        self.down = False
        self.asked: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(parse_qs(request.content.decode())["token"][0])
        if self.down:
            return httpx.Response(503)
        return httpx.Response(200, json={"active": True, "username": "alice", "exp": time.time() + 300})

    def verifier(self, denylist: Denylist) -> Verifier:
        config = TokensConfig(
            introspection=IntrospectionConfig(endpoint="https://idp.test/introspect", client_id="gw"),
            required_claims=("exp", "username"),
        )
        client = httpx.AsyncClient(transport=httpx.MockTransport(self))
        hashed = Sealer(STORE_SECRET).token_hash
        return build_verifier(config, StaticKey(None), lambda section: client, token_hash=hashed, denied=denylist)


async def test_a_refresh_checks_the_new_access_token_at_the_introspection_endpoint(build: Build) -> None:
    introspection = Introspection()
    h = build(verifier=introspection.verifier)
    old = h.session()
    result = await h.refresher.refresh(old.refresh, old.access)
    access, _ = assert_refreshed(result, old.refresh)
    assert result.claims is not None and result.claims["username"] == "alice"
    assert access in introspection.asked and introspection.asked.count(access) == 1  # then from the cache


async def test_introspection_down_after_a_refresh_keeps_the_successor_and_answers_503(build: Build) -> None:
    introspection = Introspection()
    h = build(verifier=introspection.verifier)
    old = h.session()
    introspection.down = True
    result = await h.refresher.refresh(old.refresh, old.access)
    assert result.reason == "idp_token_unverified" and set(cookies(result)) == {REFRESH}  # 503, successor kept
    successor = cookies(result)[REFRESH][0]
    introspection.down = False
    later = await h.refresher.refresh(successor, None)
    assert later.claims is not None and h.idp.counters.refresh_ok == 1  # verified again, no second redemption
