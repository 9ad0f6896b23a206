"""Back-channel logout (gateway/backchannel.py) and the session index it ends sessions through
(gateway/session_index.py, families.FamilyIndex): each rule of OIDC Back-Channel Logout §2.6 refused."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.backchannel import EVENT, BackchannelLogout, LogoutTokenInvalid, LogoutTokens
from gateway.denylist import Denylist
from gateway.errors import KeyFetchError, StoreError
from gateway.families import SESSION, Families, FamilyIndex
from gateway.keys import StaticKey
from gateway.sealing import Sealer
from gateway.store import MemoryStore, RecordKeys

SECRET = "logout-token-secret-0123456789abcdef"
ISSUER = "https://idp.example"
CLIENT = "legacy-app"


def logout_token(**changes: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "events": {EVENT: {}},
        "sub": "alice",
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "logout+jwt"})


class Harness:
    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore("t:", clock=time.time)
        self.sealer = Sealer("unit-secret")
        self.denylist = Denylist(self.store)
        self.families = Families(self.store, self.sealer, self.denylist, time.time, 3600)
        self.index = FamilyIndex(self.families)
        self.tokens = tokens = LogoutTokens(
            keys=StaticKey(SECRET.encode()),
            algorithms=["HS256"],
            issuer=ISSUER,
            audience=CLIENT,
            store=self.store,
            sealer=self.sealer,
            leeway=30,
        )
        endpoint = BackchannelLogout(tokens, self.index, self.sealer)
        app = Starlette(routes=[Route("/bcl", endpoint.handle, methods=["POST"])])
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

    async def login(self, sub: str, sid: str | None, jti: str) -> str:
        """A login through the gateway: a new family; its root."""
        refresh = f"refresh-{uuid.uuid4().hex}"
        claims = {"sub": sub, "jti": jti, "exp": time.time() + 300}
        await self.families.started(claims, refresh, 3600, sid=sid, id_token=f"id-token-of-{jti}")
        return self.sealer.token_hash(refresh)

    async def post(self, token: str) -> httpx.Response:
        return await self.client.post("/bcl", data={"logout_token": token})


@pytest.fixture
async def h() -> Harness:
    return Harness()


async def test_a_valid_logout_token_by_sid_ends_exactly_that_session(h: Harness) -> None:
    one = await h.login("alice", "sid-1", "jti-1")
    two = await h.login("alice", "sid-2", "jti-2")
    bob = await h.login("bob", "sid-3", "jti-3")
    answer = await h.post(logout_token(sid="sid-1"))
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    assert await h.families.ended(one) == "session_ended"
    assert await h.families.ended(two) is None and await h.families.ended(bob) is None
    assert "jti-1" in h.denylist and SESSION + one in h.denylist  # its access token, its sockets
    assert "jti-2" not in h.denylist and "jti-3" not in h.denylist


async def test_an_access_token_past_exp_but_within_the_leeway_is_refused_when_its_session_ends(h: Harness) -> None:
    """Regression (I3): a family's access token was counted (members) and refused only until its exp, while
    verification accepts it for tokens.leeway (30 s) past it: ended at exp - 0, it passed again right away."""
    claims = {"sub": "alice", "jti": "jti-late", "exp": time.time() - 5}  # expired 5 s ago: verifies still
    await h.families.started(claims, "refresh-late", 3600, sid="sid-late")
    assert (await h.post(logout_token(sub=None, sid="sid-late"))).status_code == 200
    assert "jti-late" in h.denylist


async def test_a_session_without_a_refresh_token_ends_too(h: Harness) -> None:
    """Regression: a login without offline_access (no refresh token) was in no family, so nothing could end it."""
    await h.families.started({"sub": "alice", "jti": "jti-only", "exp": time.time() + 300, "sid": "sid-9"}, None, None)
    assert (await h.post(logout_token(sub=None, sid="sid-9"))).status_code == 200
    assert "jti-only" in h.denylist
    assert [s.ended for s in await h.index.sessions(sid="sid-9")] == ["session_ended"]


async def test_the_id_tokens_sub_indexes_the_session(h: Harness) -> None:
    """Logout tokens carry the ID token's sub, which may differ from the access token's (pairwise subjects)."""
    claims = {"sub": "access-sub", "jti": "jti-1", "exp": time.time() + 300}
    await h.families.started(claims, "refresh-x", 3600, sub="id-sub", sid=None)
    assert (await h.post(logout_token(sub="id-sub"))).status_code == 200
    assert "jti-1" in h.denylist


async def test_a_logout_token_by_sub_ends_every_session_of_the_subject(h: Harness) -> None:
    roots = [await h.login("alice", "sid-1", "jti-1"), await h.login("alice", None, "jti-2")]
    bob = await h.login("bob", "sid-3", "jti-3")
    assert (await h.post(logout_token(sub="alice"))).status_code == 200
    assert [await h.families.ended(r) for r in roots] == ["session_ended", "session_ended"]
    assert await h.families.ended(bob) is None and "jti-3" not in h.denylist


@pytest.mark.parametrize(
    ("changes", "description"),
    [
        ({"aud": "another-client"}, "aud"),
        ({"iss": "https://evil.example"}, "iss"),
        ({"nonce": "n-123"}, "nonce"),
        ({"events": None}, "events"),
        ({"events": {EVENT: "yes"}}, "events"),
        ({"events": {"http://example/other": {}}}, "events"),
        ({"iat": int(time.time()) - 3600}, "too old"),
        ({"iat": int(time.time()) + 3600}, "future"),
        ({"iat": None}, "iat"),
        ({"jti": None}, "jti"),
        ({"sub": None}, "sub nor sid"),
    ],
)
async def test_each_rule_refuses_the_token(h: Harness, changes: dict[str, Any], description: str) -> None:
    root = await h.login("alice", "sid-1", "jti-1")
    answer = await h.post(logout_token(**changes))
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request" and description in answer.json()["error_description"]
    assert await h.families.ended(root) is None and "jti-1" not in h.denylist


async def test_a_replayed_jti_is_refused(h: Harness) -> None:
    await h.login("alice", "sid-1", "jti-1")
    token = logout_token(sid="sid-1")
    assert (await h.post(token)).status_code == 200
    replay = await h.post(token)
    assert replay.status_code == 400 and "already used" in replay.json()["error_description"]


async def test_bad_signatures_algorithms_and_bodies_are_refused(h: Harness) -> None:
    forged = jwt.encode({"iss": ISSUER, "aud": CLIENT}, "another-secret-0123456789abcdef-xyz", algorithm="HS256")
    assert (await h.post(forged)).status_code == 400
    unsigned = jwt.encode({"iss": ISSUER, "aud": CLIENT, "events": {EVENT: {}}, "sub": "a"}, None, algorithm="none")
    assert (await h.post(unsigned)).status_code == 400
    assert (await h.post("not-a-jwt")).status_code == 400
    assert (await h.client.post("/bcl", data={})).status_code == 400
    as_json = await h.client.post("/bcl", json={"logout_token": logout_token()})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"


async def test_the_index_lists_sessions_without_tokens_and_follows_rotations(h: Harness) -> None:
    root = await h.login("alice", "sid-1", "jti-1")
    [found] = await h.index.sessions(sub="alice")
    assert (found.sub, found.sid, found.ended, found.refreshed) == ("alice", "sid-1", None, None)
    assert root.startswith(found.id)
    await h.families.link(root, "refresh-successor", {"jti": "jti-1b"}, 3600)
    [found] = await h.index.sessions(sid="sid-1")
    assert found.refreshed is not None
    assert await h.index.sessions(sub="bob") == [] and await h.index.sessions(sub="alice", sid="sid-9") == []
    assert await h.families.index.id_token(root) == "id-token-of-jti-1"
    [ended] = await h.index.end(sub="alice", sid="sid-1")
    assert ended.id == found.id and await h.index.end(sub="alice") == []  # ended once
    assert (await h.index.sessions(sub="alice"))[0].ended == "session_ended"


async def test_index_records_are_bound_to_their_keys(h: Harness) -> None:
    """I4: an owner record copied to another family's key does not unseal."""
    one = await h.login("alice", "sid-1", "jti-1")
    two = await h.login("bob", "sid-2", "jti-2")
    stolen = await h.store.get(f"owner:{{{one}}}")
    assert stolen is not None
    await h.store.set(f"owner:{{{two}}}", stolen, 60)
    assert await h.families.index.owner(two) is None
    assert [s.sub for s in await h.index.sessions(sub="alice")] == ["alice"]


class FailingStore(MemoryStore):
    """Fails ``end_family`` ``failures`` times with StoreError (Redis down mid-logout)."""

    failures = 1

    async def end_family(self, keys: Any, reason: str, ttl: float, now: float) -> Any:
        if self.failures:
            self.failures -= 1
            raise StoreError("store down")
        return await super().end_family(keys, reason, ttl, now)


async def test_a_store_outage_is_503_and_the_idps_retry_of_the_same_token_works() -> None:
    h = Harness(FailingStore("t:", clock=time.time))
    root = await h.login("alice", "sid-1", "jti-1")
    token = logout_token(sid="sid-1")
    down = await h.post(token)
    assert down.status_code == 503 and down.headers["retry-after"] == "5"
    assert down.json() == {"error": "temporarily_unavailable"}
    assert (await h.post(token)).status_code == 200  # not taken for a replay
    assert await h.families.ended(root) == "session_ended"


class LostReplyStore(MemoryStore):
    """``end_family`` runs, then its reply is lost once (a timeout, a reset after the script ran)."""

    lost = 1

    async def end_family(self, keys: Any, reason: str, ttl: float, now: float) -> Any:
        end = await super().end_family(keys, reason, ttl, now)
        if self.lost:
            self.lost -= 1
            raise StoreError("reply lost")
        return end


async def test_the_idps_retry_after_a_lost_reply_still_refuses_the_sessions_tokens() -> None:
    """Regression (I3): the first try ended the family in the store but its reply was lost (503, so the denylist
    entries were never written); the IdP's retry found the session ended already and skipped it: its access
    token, its WebSockets worked on until the token expired."""
    h = Harness(LostReplyStore("t:", clock=time.time))
    root = await h.login("alice", "sid-1", "jti-1")
    token = logout_token(sid="sid-1")
    assert (await h.post(token)).status_code == 503
    assert (await h.post(token)).status_code == 200  # the IdP's retry
    assert await h.families.ended(root) == "session_ended"
    assert "jti-1" in h.denylist and SESSION + root in h.denylist


class NoKeys:
    async def key_for(self, kid: str | None, alg: str) -> Any:
        raise KeyFetchError("jwks down")


async def test_keys_unavailable_is_503_never_a_500(h: Harness) -> None:
    h.tokens._keys = NoKeys()  # type: ignore[assignment]
    answer = await h.post(logout_token())
    assert answer.status_code == 503 and answer.headers["cache-control"] == "no-store"


class OutageStore(MemoryStore):
    """While ``down``, every write a logout makes fails (Redis went away in the middle of it)."""

    down = False

    async def end_family(self, keys: Any, reason: str, ttl: float, now: float) -> Any:
        if self.down:
            raise StoreError("store down")
        return await super().end_family(keys, reason, ttl, now)

    async def delete(self, key: str) -> None:
        if self.down:
            raise StoreError("store down")
        await super().delete(key)


async def test_the_idps_retry_after_an_outage_that_outlasted_the_logout_still_ends_the_session() -> None:
    """Regression: the jti was taken before the sessions ended and given back after; with the store down for
    both, the IdP's retry (once it was back) was refused as a replay and the session was never ended (I3)."""
    store = OutageStore("t:", clock=time.time)
    h = Harness(store)
    root = await h.login("alice", "sid-1", "jti-1")
    token = logout_token(sid="sid-1")
    store.down = True
    assert (await h.post(token)).status_code == 503
    store.down = False
    retry = await h.post(token)
    assert retry.status_code == 200, retry.text
    assert await h.families.ended(root) == "session_ended" and "jti-1" in h.denylist
    assert (await h.post(token)).status_code == 400  # and then it is a replay


async def test_a_logout_whose_jti_write_loses_its_reply_is_not_taken_for_its_own_replay(
    redis_url: str, key_prefix: str
) -> None:
    """Regression: redis-py sends a command again after a connection reset; the jti's SET NX that had landed
    answered "exists" the second time, and the logout token was refused as a replay (400: the IdP never
    retries it) with its session left alive (I3)."""
    from urllib.parse import urlsplit

    from support.faultproxy import FaultProxy

    from gateway.store.redis import RedisStore

    parts = urlsplit(redis_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        store = RedisStore(proxy.redis_url(), key_prefix)
        try:
            h = Harness(store)  # type: ignore[arg-type]
            root = await h.login("alice", "sid-1", "jti-1")
            rule = proxy.add_rule(r"^SET \S*logout-jti:", "reset_after")
            answer = await h.post(logout_token(sid="sid-1"))
            assert proxy.matched(rule) == 1
            assert answer.status_code == 200, answer.text
            assert await h.families.ended(root) == "session_ended"
        finally:
            await store.close()


class BlipAtLogin(MemoryStore):
    """The store fails ``failures`` writes of expiring sets (a blip while a login indexes its session)."""

    failures = 0

    async def add_member(self, key: str, member: str, expires_at: float) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreError("store down")
        await super().add_member(key, member, expires_at)


async def test_a_session_whose_login_met_a_store_blip_is_still_ended_by_back_channel_logout() -> None:
    """Regression: the login's records (family, access token, index) were written once, best effort; a store blip
    then left the session out of the index for good, and the IdP's back-channel logout answered 200 while the
    session carried on (I3)."""
    store = BlipAtLogin("t:", clock=time.time)
    h = Harness(store)
    store.failures = 2
    root = await h.login("alice", "sid-1", "jti-1")  # the login itself goes on
    for _ in range(40):  # the records land once the store answers again
        if await h.index.sessions(sid="sid-1"):
            break
        await asyncio.sleep(0.05)
    assert (await h.post(logout_token(sid="sid-1"))).status_code == 200
    assert await h.families.ended(root) == "session_ended" and "jti-1" in h.denylist


async def test_the_idps_retry_after_a_worker_died_mid_logout_refuses_the_sessions_tokens() -> None:
    """Regression: a worker that died between marking a family ended and denylisting its access tokens left them
    valid until they expired; the IdP's retry (no 200 came back) skipped the family as ended already (I3)."""
    h = Harness()
    root = await h.login("alice", "sid-1", "jti-1")
    await h.store.end_family(RecordKeys(root, root), "session_ended", 3600, time.time())  # and then it died
    assert (await h.post(logout_token(sid="sid-1"))).status_code == 200
    assert "jti-1" in h.denylist and SESSION + root in h.denylist


async def test_a_replay_stays_refused_after_a_reload_that_raises_the_leeway() -> None:
    """Regression: the used jti was kept MAX_AGE + 2 x the leeway serving at the logout; after a reload that raised
    tokens.leeway, the same logout token was accepted again (its iat still young enough) once that mark lapsed,
    ending the sessions the user had started since."""
    now = [time.time()]
    store = MemoryStore("t:", clock=lambda: now[0])

    def tokens(leeway: float) -> LogoutTokens:
        return LogoutTokens(
            keys=StaticKey(SECRET.encode()), algorithms=["HS256"], issuer=ISSUER, audience=CLIENT, store=store,
            sealer=Sealer("unit-secret"), leeway=leeway, clock=lambda: now[0],
        )  # fmt: skip

    token = logout_token(sid="sid-1", iat=int(now[0]))
    before = tokens(0)
    assert await before.verify(token) == ("alice", "sid-1")
    await before.spent(token)
    now[0] += 400  # past the mark's 360 s, within what the raised leeway accepts (300 + 300 s)
    with pytest.raises(LogoutTokenInvalid, match="already used"):
        await tokens(300).verify(token)
