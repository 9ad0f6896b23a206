"""Server-side session records (gateway.sessions) on MemoryStore and a real Redis: sealed, bound to their key,
compare-and-set, idle and absolute expiry (injected clock), the per-worker cache and its invalidation, indexes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from uuid import uuid4

import pytest

from gateway.config import CookiesConfig, SessionConfig
from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.families import SESSION
from gateway.sealing import Sealer
from gateway.sessions import ServerSessions, session_key
from gateway.store import MemoryStore, Store
from gateway.store.redis import RedisStore

SECRET = "store-secret-for-tests"
CLAIMS = {"sub": "alice", "sid": "idp-session-1"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(f"gwtest:{uuid4().hex[:8]}:")
        return
    redis_store = RedisStore(request.getfixturevalue("redis_url"), request.getfixturevalue("key_prefix"))
    try:
        yield redis_store
    finally:
        await redis_store.close()


def sessions_on(store: Store, clock: Clock | None = None, **config: int) -> ServerSessions:
    settings = SessionConfig(mode="server", **config)  # type: ignore[arg-type]
    return ServerSessions(settings, CookiesConfig(), store, Sealer(SECRET), Denylist(store), clock or time.time)


def h_of(sessions: ServerSessions, set_cookie: bytes) -> str:
    value = set_cookie.decode().split(";")[0].split("=", 1)[1]
    h = sessions.open_cookie(value)
    assert h is not None
    return h


async def test_a_session_is_a_sealed_record_and_a_cookie_without_a_token(store: Store) -> None:
    sessions = sessions_on(store)
    h, cookie = await sessions.create("ACCESS.TOKEN.x", "REFRESH-1", "ID.TOKEN.x", CLAIMS, "root1")
    text = cookie.decode()
    assert text.startswith("__Host-gw_session=") and "; HttpOnly" in text and "; Secure" in text
    assert "SameSite=Lax" in text and "Path=/" in text and "Max-Age=1209600" in text
    assert "ACCESS" not in text and "REFRESH" not in text and "ID.TOKEN" not in text
    assert h_of(sessions, cookie) == h
    raw = await store.get(session_key(h))
    assert raw is not None and b"ACCESS" not in raw and b"REFRESH" not in raw and b"alice" not in raw
    loaded = await sessions.load(h)
    assert loaded is not None
    assert (loaded.record.access, loaded.record.refresh, loaded.record.id_token) == (
        "ACCESS.TOKEN.x",
        "REFRESH-1",
        "ID.TOKEN.x",
    )
    assert (loaded.record.sub, loaded.record.sid, loaded.record.root) == ("alice", "idp-session-1", "root1")


async def test_a_cookie_not_sealed_here_names_no_session(store: Store) -> None:
    sessions = sessions_on(store)
    _, cookie = await sessions.create("a", "r", None, CLAIMS, None)
    value = cookie.decode().split(";")[0].split("=", 1)[1]
    assert sessions.open_cookie(value[:-2] + ("AA" if not value.endswith("AA") else "BB")) is None
    assert sessions.open_cookie(Sealer("another-secret").seal_cookie("x" * 43, sessions.cookie_name)) is None
    assert sessions.open_cookie(Sealer(SECRET).seal_cookie("x" * 43, "__Host-other")) is None


async def test_a_record_copied_to_another_key_does_not_unseal(store: Store) -> None:
    """I4: someone who can write to the store but lacks the secret cannot move a session to another id."""
    sessions = sessions_on(store)
    victim, _ = await sessions.create("victim-access", "victim-refresh", None, CLAIMS, None)
    attacker, _ = await sessions.create("own-access", "own-refresh", None, {"sub": "mallory"}, None)
    stolen = await store.get(session_key(victim))
    assert stolen is not None
    await store.set(session_key(attacker), stolen, 60)
    assert await sessions_on(store).load(attacker) is None  # a fresh worker: nothing cached


async def test_compare_and_set_a_stale_writer_loses(store: Store) -> None:
    sessions = sessions_on(store)
    h, _ = await sessions.create("a1", "r1", None, CLAIMS, None)
    first = await sessions.load(h, fresh=True)
    second = await sessions_on(store).load(h, fresh=True)  # another worker read the same version
    assert first is not None and second is not None
    saved = await sessions.save(first, replace(first.record, refresh="r2"))
    assert saved is not None
    assert await sessions_on(store).save(second, second.record) is None  # read before the update: loses
    again = await sessions_on(store).load(h)
    assert again is not None and again.record.refresh == "r2"


async def test_ending_a_session_deletes_it_and_every_worker_drops_its_cached_copy(store: Store) -> None:
    shared = Denylist(store)
    one = ServerSessions(SessionConfig(mode="server"), CookiesConfig(), store, Sealer(SECRET), shared)
    other = ServerSessions(SessionConfig(mode="server"), CookiesConfig(), store, Sealer(SECRET), shared)
    h, _ = await one.create("a", "r", None, CLAIMS, "fam")
    cached = await other.load(h)
    assert cached is not None and await other.load(h) is cached  # served from its cache
    await one.end(h, cached.record)
    assert await store.get(session_key(h)) is None
    assert SESSION + "fam" in shared
    assert await other.load(h) is None  # the cached copy is dropped at once on the denylist entry


class LostDeleteReply(MemoryStore):
    """``delete`` happens, then its reply is lost (a timeout, a reset after the command ran)."""

    async def delete(self, key: str) -> None:
        await super().delete(key)
        raise StoreError("reply lost")


async def test_an_end_whose_delete_reply_is_lost_still_drops_every_workers_cached_copy() -> None:
    """Regression (I3): the record was deleted but the reply lost, so ``session:{root}`` never reached the
    denylist; a retry (logout's, the IdP's back-channel) finds no record and ends nothing, and other workers
    served their cached copy until it lapsed."""
    store = LostDeleteReply()
    shared = Denylist(store)
    one = ServerSessions(SessionConfig(mode="server"), CookiesConfig(), store, Sealer(SECRET), shared)
    other = ServerSessions(SessionConfig(mode="server"), CookiesConfig(), store, Sealer(SECRET), shared)
    h, _ = await one.create("a", None, None, CLAIMS, None)
    cached = await other.load(h)
    assert cached is not None
    with pytest.raises(StoreError):
        await one.end(h, cached.record)
    assert await one.load(h, fresh=True) is None  # gone: a retry finds nothing to end
    assert await other.load(h) is None  # the cached copy is dropped all the same


async def test_sessions_are_found_by_sub_and_by_sid(store: Store) -> None:
    sessions = sessions_on(store)
    one, _ = await sessions.create("a", "r", None, CLAIMS, None)
    two, _ = await sessions.create("a", "r", None, {"sub": "alice", "sid": "idp-session-2"}, None)
    await sessions.create("a", "r", None, {"sub": "bob"}, None)
    assert sorted(await sessions.of("sub", "alice")) == sorted([one, two])
    assert await sessions.of("sid", "idp-session-2") == [two]
    assert await sessions.of("sub", "nobody") == []


async def test_idle_timeout_ends_an_unused_session_and_use_keeps_it_alive() -> None:
    clock = Clock()
    store = MemoryStore("gw:", clock=clock)
    sessions = sessions_on(store, clock, idle_timeout=400, absolute_timeout=100_000)
    assert sessions.touch_every == 50  # an eighth of the idle timeout (at most a minute)
    h, _ = await sessions.create("a", "r", None, CLAIMS, None)
    for _ in range(10):  # used every 300 s for 3000 s: alive, well past the idle timeout
        clock.now += 300
        assert await sessions.load(h) is not None
    clock.now += 401
    assert await sessions.load(h) is None
    assert await store.get(session_key(h)) is None


async def test_a_use_is_recorded_at_most_once_per_interval() -> None:
    clock = Clock()
    store = MemoryStore("gw:", clock=clock)
    sessions = sessions_on(store, clock, idle_timeout=400)
    h, _ = await sessions.create("a", "r", None, CLAIMS, None)
    raw = await store.get(session_key(h))
    clock.now += 30
    assert (await sessions.load(h, fresh=True)) is not None
    assert await store.get(session_key(h)) == raw  # within the interval: no write
    clock.now += 30
    assert (await sessions.load(h, fresh=True)) is not None
    assert await store.get(session_key(h)) != raw  # past it: the use is recorded


async def test_absolute_timeout_ends_a_session_however_much_it_is_used() -> None:
    clock = Clock()
    store = MemoryStore("gw:", clock=clock)
    sessions = sessions_on(store, clock, idle_timeout=800, absolute_timeout=2000)
    h, _ = await sessions.create("a", "r", None, CLAIMS, None)
    for _ in range(3):
        clock.now += 600
        assert await sessions.load(h) is not None
    clock.now += 250  # 2050 s after login
    assert await sessions.load(h) is None


async def test_the_cache_serves_until_a_use_is_due_then_reads_the_store() -> None:
    clock = Clock()
    store = MemoryStore("gw:", clock=clock)
    sessions = sessions_on(store, clock, idle_timeout=400)
    h, _ = await sessions.create("a", "r", None, CLAIMS, None)
    first = await sessions.load(h)
    await store.delete(session_key(h))  # ended behind this worker's back, without the denylist
    assert await sessions.load(h) is first  # cached
    clock.now += 51
    assert await sessions.load(h) is None  # a use was due: read the store


async def test_a_session_whose_use_cannot_be_recorded_under_contention_still_serves() -> None:
    """Regression: after three lost compare-and-set writes the session read as gone: a logout for contention."""
    clock = Clock()
    store = MemoryStore("gw:", clock=clock)
    sessions = sessions_on(store, clock, idle_timeout=400)
    h, _ = await sessions.create("a", "r", None, CLAIMS, None)
    clock.now += 100  # past touch_every: the read records a use, by compare-and-set

    async def always_lost(*args: object, **kwargs: object) -> bool:
        return False

    store.replace = always_lost  # type: ignore[method-assign]
    loaded = await sessions.load(h, fresh=True)
    assert loaded is not None and loaded.record.access == "a"


def test_the_touch_interval_never_falls_under_a_second() -> None:
    assert sessions_on(MemoryStore("gw:", clock=time.time), idle_timeout=1, absolute_timeout=10).touch_every == 1


async def test_a_use_that_cannot_be_recorded_still_serves_the_session_read() -> None:
    """Recording a use is bookkeeping: a store error on it (a lost reply, a reset) must not turn a session that
    was just read into a 503. The record is served as read, not cached, and the next read records the use."""

    class FailingReplace(MemoryStore):
        failures = 1

        async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
            if self.failures:
                self.failures -= 1
                raise StoreError("replace failed: reply lost")
            return await super().replace(key, expected, value, ttl)

    clock = Clock()
    store = FailingReplace("gw:", clock=clock)
    sessions = sessions_on(store, clock, idle_timeout=400)
    h, _ = await sessions.create("a", "r", None, CLAIMS, None)
    raw = await store.get(session_key(h))
    clock.now += 60  # a use is due
    loaded = await sessions.load(h)
    assert loaded is not None and loaded.record.access == "a"
    assert await store.get(session_key(h)) == raw  # not recorded
    again = await sessions.load(h)  # not served from the cache: read again, and the use recorded now
    assert again is not None and await store.get(session_key(h)) != raw
