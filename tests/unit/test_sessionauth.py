"""Server-side sessions as requests see them (gateway.sessionauth), in-process: two "workers" (refreshers and
session caches of their own) on one MemoryStore, the demo IdP over ASGITransport, an injected store clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from gateway.authn import Authenticator, AuthResult
from gateway.capture import Capturer
from gateway.config import CaptureConfig, CookiesConfig, RefreshConfig, SessionConfig, TokensConfig
from gateway.cookies import CookieJar
from gateway.demo.idp import IdentityProvider, IdPSettings, TokenPair, create_idp_app
from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.families import Families
from gateway.idp_client import IdPClient
from gateway.keys import StaticKey
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.refresh import SessionRefresher
from gateway.sealing import Sealer
from gateway.sessionauth import SessionAuth
from gateway.sessions import ServerSessions, session_key
from gateway.store import MemoryStore
from gateway.tokens import Verifier

SECRET = IdPSettings.hs_secret
IDP = "http://idp.test"
STORE_SECRET = "store-secret-for-tests"
SESSION_COOKIE = "__Host-gw_session"
GRACE = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    app: httpx.AsyncClient
    idp: IdentityProvider
    store: MemoryStore
    clock: Clock
    workers: list[SessionAuth]
    verifier: Verifier

    async def login(self, pair: TokenPair, claims: dict[str, str] | None = None) -> str:
        """A session started as a login does; the Cookie header that carries it."""
        cookie = await self.workers[0].start(pair.access, pair.refresh, None, claims or {"sub": "alice"})
        return "Cookie", cookie.decode().split(";")[0]  # type: ignore[return-value]

    async def record(self, cookie: str) -> bytes | None:
        h = self.workers[0].sessions.open_cookie(cookie.split("=", 1)[1])
        assert h is not None
        return await self.store.get(session_key(h))


@pytest.fixture
async def world() -> AsyncIterator[Callable[[], World]]:
    made: list[tuple[httpx.AsyncClient, list[SessionRefresher]]] = []

    def make() -> World:
        app = create_idp_app(IdPSettings())
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        clock = Clock()
        store = MemoryStore("gw:", clock=clock)
        sealer = Sealer(STORE_SECRET)
        denylist = Denylist(store)  # one copy for both workers: the sync between workers is Denylist's own test
        families = Families(store, sealer, denylist, time.time, 3600)
        tokens = TokensConfig(algorithms=("HS256",), secret=SECRET, audience="legacy-app", leeway=0)
        verifier = Verifier(tokens, StaticKey(SECRET.encode()), denied=denylist)
        refresh = RefreshConfig(
            endpoint=f"{IDP}/token",
            client_id="legacy-app",
            client_secret="demo-secret",
            client_auth="basic",
            revocation_endpoint=f"{IDP}/revoke",
            grace_period=GRACE,
            timeout=5,
            wait_timeout=5,
        )
        workers, refreshers = [], []
        for _ in range(2):
            refresher = SessionRefresher(
                config=refresh,
                store=store,
                sealer=sealer,
                idp=IdPClient(refresh, http),
                verifier=verifier,
                jar=CookieJar.from_config(CookiesConfig(), sealer),
                metrics=Metrics(),
                families=families,
            )
            refreshers.append(refresher)
            sessions = ServerSessions(SessionConfig(mode="server"), CookiesConfig(), store, sealer, denylist, clock)
            workers.append(
                SessionAuth(
                    sessions=sessions,
                    verifier=verifier,
                    refresher=refresher,
                    families=families,
                    sealer=sealer,
                    absolute_timeout=3600,
                )
            )
        made.append((http, refreshers))
        return World(http, app.state.idp, store, clock, workers, verifier)

    yield make
    for http, refreshers in made:
        for refresher in refreshers:
            await refresher.close()
        await http.aclose()


def headers(cookie: str) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", cookie.encode())]


def cleared(result: AuthResult) -> bool:
    return result.set_cookies == [f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax; Secure".encode()]


async def test_a_storm_on_an_expired_session_across_workers_makes_one_idp_call(world: Callable[[], World]) -> None:
    w = world()
    pair = w.idp.start_session("alice", ttl=-60)
    _, cookie = await w.login(pair)
    results = await asyncio.gather(*(w.workers[i % 2].authenticate(headers(cookie)) for i in range(100)))
    assert w.idp.counters.refresh_calls == 1
    assert all(r.claims is not None and r.claims["sub"] == "alice" and r.reason is None for r in results)
    assert len({r.token for r in results}) == 1 and results[0].token != pair.access
    assert all(r.set_cookies == [] for r in results)  # never a token cookie, not even the session's
    # The successor lives in the record: a later request on either worker needs no IdP call.
    again = await w.workers[1].authenticate(headers(cookie))
    assert again.token == results[0].token and w.idp.counters.refresh_calls == 1


async def test_an_old_record_within_grace_gets_the_successor_and_after_grace_ends_the_session(
    world: Callable[[], World],
) -> None:
    w = world()
    pair = w.idp.start_session("alice", ttl=-60)
    _, cookie = await w.login(pair)
    h = w.workers[0].sessions.open_cookie(cookie.split("=", 1)[1])
    assert h is not None
    old = await w.store.get(session_key(h))
    first = await w.workers[0].authenticate(headers(cookie))
    assert first.claims is not None
    assert old is not None
    await w.store.set(session_key(h), old, 60)  # the pre-rotation state comes back (a stale write, a restore)
    replay = await w.workers[1].authenticate(headers(cookie))
    assert replay.token == first.token and w.idp.counters.refresh_calls == 1  # grace: no IdP call
    await w.store.set(session_key(h), old, 600)
    w.clock.now += 61  # past the grace period, and past the workers' cached copies (a use is due)
    late = await w.workers[1].authenticate(headers(cookie))
    assert late.reason == Reason.REUSE and cleared(late)
    assert w.idp.counters.refresh_calls == 1  # the reused token never reached the IdP
    assert await w.store.get(session_key(h)) is None
    gone = await w.workers[0].authenticate(headers(cookie))
    assert gone.reason == Reason.SESSION_ENDED and gone.claims is None


async def test_idp_down_keeps_the_session(world: Callable[[], World]) -> None:
    w = world()
    pair = w.idp.start_session("alice", ttl=-60)
    _, cookie = await w.login(pair)
    before = await w.record(cookie)
    w.idp.behaviour.update({"fail": "503", "fail_count": 1})
    down = await w.workers[0].authenticate(headers(cookie))
    assert down.reason == Reason.IDP_ERROR and down.set_cookies == []
    assert await w.record(cookie) == before
    w.clock.now += 2.5  # past the 2 s a failure is shared
    up = await w.workers[1].authenticate(headers(cookie))
    assert up.claims is not None and up.set_cookies == []


async def test_a_store_outage_is_503_and_keeps_the_session(world: Callable[[], World]) -> None:
    w = world()
    pair = w.idp.start_session("alice", ttl=-60)
    _, cookie = await w.login(pair)

    async def broken(key: str) -> bytes | None:
        raise StoreError("down")

    w.store.get = broken  # type: ignore[method-assign]
    result = await w.workers[1].authenticate(headers(cookie))
    assert result.reason == Reason.STORE_UNAVAILABLE and result.set_cookies == []


async def test_logout_ends_the_session_on_every_worker_and_revokes_at_the_idp(world: Callable[[], World]) -> None:
    w = world()
    pair = w.idp.start_session("alice")
    _, cookie = await w.login(pair)
    for worker in w.workers:  # both have it cached
        assert (await worker.authenticate(headers(cookie))).claims is not None
    await w.workers[0].logout(cookie.split("=", 1)[1])
    assert w.idp.counters.revocations == 1
    for worker in w.workers:
        result = await worker.authenticate(headers(cookie))
        assert result.claims is None and result.reason == Reason.SESSION_ENDED and cleared(result)
    assert (await w.verifier.verify(pair.access)).reason == Reason.TOKEN_REVOKED  # its access token too


async def test_a_logout_during_a_store_outage_is_refused_at_once_by_the_worker_that_took_it(
    world: Callable[[], World],
) -> None:
    """Regression: the logout answered 303 with the cookie cleared while this worker's cached copy kept serving."""
    w = world()
    pair = w.idp.start_session("alice")
    _, cookie = await w.login(pair)
    assert (await w.workers[0].authenticate(headers(cookie))).claims is not None  # cached here

    async def broken(*args: object, **kwargs: object) -> None:
        raise StoreError("down")

    w.store.get = broken  # type: ignore[method-assign,assignment]
    w.store.delete = broken  # type: ignore[method-assign,assignment]
    await w.workers[0].logout(cookie.split("=", 1)[1])
    result = await w.workers[0].authenticate(headers(cookie))
    assert result.claims is None  # refused here at once: ended, or 503 while the store is down; never a 200
    assert (await w.verifier.verify(pair.access)).reason == Reason.TOKEN_REVOKED  # the fast path's token too


async def test_every_session_of_a_subject_or_an_idp_session_can_be_ended(world: Callable[[], World]) -> None:
    w = world()
    _, one = await w.login(w.idp.start_session("alice"), {"sub": "alice", "sid": "s1"})
    _, two = await w.login(w.idp.start_session("alice"), {"sub": "alice", "sid": "s2"})
    _, bob = await w.login(w.idp.start_session("bob"), {"sub": "bob", "sid": "s3"})
    assert await w.workers[1].end_sessions_of(sid="s2") == 1
    assert (await w.workers[0].authenticate(headers(two))).reason == Reason.SESSION_ENDED
    assert (await w.workers[0].authenticate(headers(one))).claims is not None
    assert await w.workers[1].end_sessions_of(sub="alice") == 1
    assert (await w.workers[0].authenticate(headers(one))).reason == Reason.SESSION_ENDED
    assert (await w.workers[0].authenticate(headers(bob))).claims is not None


async def test_a_login_is_indexed_by_the_id_tokens_sub_and_sid_which_logout_tokens_name(
    world: Callable[[], World],
) -> None:
    """Regression: server sessions were indexed by the access token's sub and sid. With pairwise subjects (Okta,
    Entra) or an access token without sid, a valid logout token ended nothing."""
    from gateway.identity import index_claims
    from gateway.sessionauth import ServerSessionIndex

    w = world()
    access_claims = {"sub": "alice@example.com", "jti": "j-1"}  # no sid; another sub than the ID token's
    claims = index_claims(access_claims, {"sub": "00u-alice", "sid": "idp-sid-1", "nonce": "n"})
    _, cookie = await w.login(w.idp.start_session("alice"), claims)
    index = ServerSessionIndex(w.workers[1])
    assert [info.sid for info in await index.end(sid="idp-sid-1")] == ["idp-sid-1"]
    assert (await w.workers[0].authenticate(headers(cookie))).reason == Reason.SESSION_ENDED
    _, again = await w.login(w.idp.start_session("alice"), index_claims(access_claims, {"sub": "00u-alice"}))
    assert len(await index.end(sub="00u-alice", sid=None)) == 1
    assert (await w.workers[0].authenticate(headers(again))).reason == Reason.SESSION_ENDED


async def test_the_authenticator_reads_the_session_cookie_and_ignores_token_cookies(world: Callable[[], World]) -> None:
    w = world()
    pair = w.idp.start_session("alice")
    jar = CookieJar.from_config(CookiesConfig(), Sealer(STORE_SECRET))
    authenticator = Authenticator(w.verifier, jar, None, w.workers[0])
    tokens = f"__Host-gw_access={pair.access}"
    assert (await authenticator.authenticate(headers(tokens))).reason == Reason.NO_TOKEN
    bearer = await authenticator.authenticate([(b"authorization", f"Bearer {pair.access}".encode())])
    assert bearer.claims is not None and bearer.bearer  # API clients as before
    _, cookie = await w.login(pair)
    session = await authenticator.authenticate(headers(cookie))
    assert session.claims is not None and session.watch is not None and session.until is not None
    forged = await authenticator.authenticate(headers(f"{SESSION_COOKIE}=bm90LW91cnM"))
    assert forged.reason == Reason.NO_TOKEN and cleared(forged)


async def test_a_captured_login_sets_only_the_session_cookie(world: Callable[[], World]) -> None:
    w = world()
    pair = w.idp.start_session("alice")
    jar = CookieJar.from_config(CookiesConfig(), Sealer(STORE_SECRET))
    capturer = Capturer(jar, w.verifier, sessions=w.workers[0])
    body = json.dumps({"access": pair.access, "refresh": pair.refresh}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    captured = await capturer.take(CaptureConfig(), [(b"content-type", b"application/json")], chunks(), "login")
    assert captured.reason is None
    set_cookies = [v.decode() for n, v in captured.headers if n == b"set-cookie"]
    assert len(set_cookies) == 1 and set_cookies[0].startswith(f"{SESSION_COOKIE}=")
    assert pair.refresh not in set_cookies[0] and pair.access not in set_cookies[0]
    assert pair.refresh.encode() not in captured.body
    result = await w.workers[1].authenticate(headers(set_cookies[0].split(";")[0]))
    assert result.claims is not None and result.token == pair.access


async def test_a_successor_whose_access_token_does_not_verify_is_kept_in_the_record(
    world: Callable[[], World],
) -> None:
    """The IdP redeemed the token: its successor is the session now, even though this answer is 502."""
    w = world()
    pair = w.idp.start_session("alice", ttl=-60)
    _, cookie = await w.login(pair)
    w.idp.behaviour.update({"fail": "bad_signature", "fail_count": 1})
    first = await w.workers[0].authenticate(headers(cookie))
    assert first.reason == Reason.IDP_BAD_RESPONSE and first.set_cookies == []
    after = await w.workers[1].authenticate(headers(cookie))  # the successor refreshes, and works
    assert after.claims is not None and w.idp.counters.refresh_calls == 2
    redeemed = [e["jti"] for e in w.idp.ledger.entries if e["event"] == "redeemed"]
    assert len(redeemed) == 2 and len(set(redeemed)) == 2  # no token presented twice


async def test_a_failed_early_refresh_goes_on_with_the_still_valid_token(world: Callable[[], World]) -> None:
    w = world()
    now = int(time.time())
    pair = w.idp.start_session("alice", ttl=10, claims={"iat": now - 3000})  # 10 s left: due, still valid
    _, cookie = await w.login(pair)
    w.idp.behaviour.update({"fail": "503", "fail_count": 1})
    result = await w.workers[0].authenticate(headers(cookie))
    assert result.claims is not None and result.token == pair.access and result.set_cookies == []
    assert w.idp.counters.refresh_calls == 1


async def test_a_successor_not_valid_yet_is_503_on_every_request_until_it_is(world: Callable[[], World]) -> None:
    """An IdP clock ahead of ours (or a new kid with the JWKS down): the record's successor does not verify yet.
    Every request meanwhile is a 503 with the session kept, never a 401 (a login redirect for a page), and no
    second IdP call; once the token is valid here, the same session works."""
    w = world()
    pair = w.idp.start_session("alice", ttl=-60)
    _, cookie = await w.login(pair)
    w.idp.behaviour.update({"clock_skew": 3})
    first = await w.workers[0].authenticate(headers(cookie))
    assert first.reason == Reason.IDP_TOKEN_UNVERIFIED and first.set_cookies == []
    for worker in w.workers:  # the record holds the successor now: verified again, still not valid
        again = await worker.authenticate(headers(cookie))
        assert again.reason == Reason.IDP_TOKEN_UNVERIFIED and again.set_cookies == []
    assert w.idp.counters.refresh_calls == 1
    w.verifier._clock = lambda: time.time() + 3.5  # type: ignore[method-assign]  # our clock caught up
    later = await w.workers[1].authenticate(headers(cookie))
    assert later.claims is not None and w.idp.counters.refresh_calls == 1


async def test_a_store_outage_during_an_early_refresh_goes_on_with_the_still_valid_token(
    world: Callable[[], World],
) -> None:
    """Regression: the record's fresh read before an early refresh raised out of the session on a store error,
    a 503 although the worker's copy held a valid access token (cookie mode goes on with it, as server mode
    does when the IdP fails)."""
    w = world()
    now = int(time.time())
    pair = w.idp.start_session("alice", ttl=10, claims={"iat": now - 3000})  # 10 s left: due, still valid
    _, cookie = await w.login(pair)
    h = w.workers[0].sessions.open_cookie(cookie.split("=", 1)[1])
    assert h is not None and await w.workers[0].sessions.load(h) is not None  # this worker's copy

    async def broken(key: str) -> bytes | None:
        raise StoreError("down")

    w.store.get = broken  # type: ignore[method-assign]
    result = await w.workers[0].authenticate(headers(cookie))
    assert result.claims is not None and result.token == pair.access and result.set_cookies == []
    assert w.idp.counters.refresh_calls == 0


async def test_a_logout_the_store_cannot_write_is_refused_at_once_by_the_worker_that_took_it(
    world: Callable[[], World],
) -> None:
    """Regression: with a store that reads but cannot write (a master demoted to a read-only replica in a
    failover), ending the record dropped this worker's copy before its delete failed, so the logout's own
    fallback had nothing left to refuse: the next request read the record again and got a 200 (I3)."""
    w = world()
    pair = w.idp.start_session("alice")
    _, cookie = await w.login(pair)
    assert (await w.workers[0].authenticate(headers(cookie))).claims is not None  # cached here

    async def read_only(*args: object, **kwargs: object) -> None:
        raise StoreError("READONLY You can't write against a read only replica")

    for write in ("set", "delete", "replace", "add_member", "end_family"):
        setattr(w.store, write, read_only)
    await w.workers[0].logout(cookie.split("=", 1)[1])
    result = await w.workers[0].authenticate(headers(cookie))
    assert result.claims is None  # refused here at once: never a 200 after the logout
    for write in ("set", "delete", "replace", "add_member", "end_family"):
        delattr(w.store, write)  # the store writes again: the logout lands in the background
    for _ in range(40):
        if await w.record(cookie) is None:
            break
        await asyncio.sleep(0.05)
    assert await w.record(cookie) is None


async def test_a_session_the_idp_ended_is_never_served_with_its_still_valid_token_when_the_store_fails(
    world: Callable[[], World],
) -> None:
    """An early refresh the IdP refuses (invalid_grant) ends the session even when its record cannot be deleted
    then: a 503 at worst, never a 200 with the access token that is still valid."""
    w = world()
    now = int(time.time())
    pair = w.idp.start_session("alice", ttl=10, claims={"iat": now - 3000})  # 10 s left: due, still valid
    _, cookie = await w.login(pair)
    h = w.workers[0].sessions.open_cookie(cookie.split("=", 1)[1])
    assert h is not None and await w.workers[0].sessions.load(h) is not None  # this worker's copy
    w.idp.revoke(pair.refresh)

    async def broken(key: str) -> None:
        raise StoreError("down")

    w.store.delete = broken  # type: ignore[method-assign]
    assert (await w.workers[0].authenticate(headers(cookie))).claims is None
    assert (await w.workers[0].authenticate(headers(cookie))).claims is None
    assert w.idp.counters.refresh_calls == 1


async def test_a_stale_copy_is_never_refreshed_when_the_record_cannot_be_read(world: Callable[[], World]) -> None:
    """A worker's cached copy may hold a refresh token another worker has rotated since: when the record's fresh
    read fails, the copy is never presented (past grace that is reuse, and the whole session would end): 503,
    the session kept."""
    w = world()
    pair = w.idp.start_session("alice", ttl=-60)
    _, cookie = await w.login(pair)
    h = w.workers[1].sessions.open_cookie(cookie.split("=", 1)[1])
    assert h is not None and await w.workers[1].sessions.load(h) is not None  # worker 1's copy: the old tokens
    assert (await w.workers[0].authenticate(headers(cookie))).claims is not None  # worker 0 rotates them
    w.clock.now += GRACE + 1
    get = w.store.get

    async def blip_on_the_record(key: str) -> bytes | None:
        if key.startswith("sess:"):
            raise StoreError("connection reset")
        return await get(key)

    w.store.get = blip_on_the_record  # type: ignore[method-assign]
    blip = await w.workers[1].authenticate(headers(cookie))
    assert blip.claims is None and blip.reason == Reason.STORE_UNAVAILABLE and blip.set_cookies == []
    w.store.get = get  # type: ignore[method-assign]
    assert (await w.workers[1].authenticate(headers(cookie))).claims is not None
    assert w.idp.counters.refresh_calls == 1
