"""gateway/denylist.py: a revoked jti is refused at once here and within a second in every other process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
import yaml
from support.fakes import RecordingUpstream
from support.waiting import announcements_arrive, until

from gateway.app import create_app
from gateway.config import parse_config
from gateway.denylist import KEY, Denylist
from gateway.errors import StoreError
from gateway.store import MemoryStore, Store
from gateway.store.redis import RedisStore


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore("gwtest:")
        return
    redis_store = RedisStore(request.getfixturevalue("redis_url"), request.getfixturevalue("key_prefix"))
    try:
        yield redis_store
    finally:
        await redis_store.close()


async def seen_within(condition: Callable[[], bool], limit: float) -> float:
    """Seconds until ``condition`` holds (polled every 10 ms); fails after ``limit``."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < limit, f"not seen within {limit}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_deny_refuses_at_once_locally(store: Store) -> None:
    denylist = Denylist(store)
    await denylist.start()
    try:
        assert "jti-1" not in denylist
        await denylist.deny("jti-1", time.time() + 60)
        assert "jti-1" in denylist  # no wait for the store round trip
        assert "jti-2" not in denylist
        assert None not in denylist and 42 not in denylist
    finally:
        await denylist.close()


async def test_denied_entry_expires_with_the_token(store: Store) -> None:
    denylist = Denylist(store)
    await denylist.start()
    try:
        await denylist.deny("short", time.time() + 0.3)
        await denylist.deny("long", time.time() + 60)
        assert "short" in denylist and "long" in denylist
        await asyncio.sleep(0.4)  # past the short one's expiry (0.3 s): expiring is the point
        assert "short" not in denylist and "long" in denylist
    finally:
        await denylist.close()


async def test_expiry_follows_the_injected_clock() -> None:
    now = [1000.0]
    denylist = Denylist(MemoryStore(), clock=lambda: now[0])
    await denylist.deny("jti", 1010.0)
    assert "jti" in denylist
    now[0] = 1009.9
    assert "jti" in denylist
    now[0] = 1010.0
    assert "jti" not in denylist


async def test_a_new_process_loads_existing_denials_at_start(store: Store) -> None:
    first = Denylist(store)
    await first.deny("earlier", time.time() + 60)
    later = Denylist(store)
    await later.start()
    try:
        await seen_within(lambda: "earlier" in later, 1.0)
    finally:
        await later.close()


async def test_another_process_refuses_within_a_second(redis_url: str, key_prefix: str) -> None:
    here, there = RedisStore(redis_url, key_prefix), RedisStore(redis_url, key_prefix)
    mine, theirs = Denylist(here), Denylist(there)
    await here.start()
    await there.start()
    await mine.start()
    await theirs.start()
    try:
        # Both sync loops are watching: announcements flow to both stores, and each loop has loaded once
        # (it registers its watch before it loads, so it hears of whatever comes after).
        await announcements_arrive(here)
        await announcements_arrive(there)
        await mine.deny("warm-up", time.time() + 60)
        await seen_within(lambda: "warm-up" in theirs, 5.0)
        for n in range(3):
            jti = f"revoked-{n}"
            started = time.monotonic()
            await mine.deny(jti, time.time() + 60)
            await seen_within(lambda jti=jti: jti in theirs, 1.0)
            assert time.monotonic() - started < 1.0
    finally:
        await mine.close()
        await theirs.close()
        await here.close()
        await there.close()


async def test_a_lost_announcement_is_caught_by_the_poll(redis_url: str, key_prefix: str) -> None:
    """Fallback when the subscription drops: an entry written without PUBLISH is still seen within ``poll``."""
    store = RedisStore(redis_url, key_prefix)
    denylist = Denylist(store, poll=0.3)
    client = aioredis.Redis.from_url(redis_url)
    await client.zadd(f"{key_prefix}{KEY}", {"earlier": time.time() + 60})
    await denylist.start()
    try:
        await seen_within(lambda: "earlier" in denylist, 5.0)  # the first load is done: what follows is the poll's
        await client.zadd(f"{key_prefix}{KEY}", {"silent": time.time() + 60})
        elapsed = await seen_within(lambda: "silent" in denylist, 1.0)
        assert elapsed < 1.0
    finally:
        await denylist.close()
        await client.aclose()
        await store.close()


async def test_store_down_deny_still_refuses_here(closed_port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{closed_port}/0", "gwtest:", socket_timeout=0.2)
    denylist = Denylist(store, poll=0.1)
    try:
        await denylist.start()  # no exception: the gateway must come up without its store
        with pytest.raises(StoreError):
            await denylist.deny("jti", time.time() + 60)
        assert "jti" in denylist  # refused locally although the store never heard of it
        await asyncio.sleep(0.8)  # several failed sync rounds (poll 0.1 s): what they leave is the point
        task = denylist._task
        assert task is not None and not task.done(), "the sync loop died"
        assert "jti" in denylist  # a failed reload keeps the local copy
    finally:
        await denylist.close()
        await store.close()


async def test_local_denial_survives_reload_that_does_not_know_it(redis_url: str, key_prefix: str) -> None:
    """A deny whose store write failed must not be dropped by the next successful reload."""
    store = RedisStore(redis_url, key_prefix)
    denylist = Denylist(store, poll=0.1)
    await denylist.start()
    try:
        denylist._local["unshared"] = time.time() + 60  # as deny() leaves it when the write fails
        await store.add_member(KEY, "shared", time.time() + 60)
        await seen_within(lambda: "shared" in denylist, 1.0)
        await asyncio.sleep(0.3)  # a few more reloads (poll 0.1 s), none of which may drop it
        assert "unshared" in denylist
    finally:
        await denylist.close()
        await store.close()


async def test_a_logged_out_token_stays_refused_for_as_long_as_the_leeway_accepts_it_past_exp() -> None:
    """Regression (I3): the entry lapsed at the token's exp while tokens.leeway accepts it 30 s longer: a
    logged-out Bearer token got 200 again from its exp until exp + leeway."""
    now = [time.time()]
    secret = "denylist-tests-secret-0123456789abcdef"
    config = {
        "server": {"access_log": False},
        "tokens": {"algorithms": ["HS256"], "secret": secret, "leeway": 30},
        "cookies": {"secure": False},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
    }
    app = create_app(parse_config(config), forwarder=RecordingUpstream(), clock=lambda: now[0])
    token = jwt.encode({"sub": "alice", "exp": int(now[0] + 10), "jti": "j-1"}, secret, algorithm="HS256")
    bearer = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        assert (await client.get("/x", headers=bearer)).status_code == 200
        assert (await client.post("/.gateway/logout", headers=bearer)).status_code == 204
        now[0] += 15  # past exp, within the leeway: the token itself would still verify
        late = await client.get("/x", headers=bearer)
    assert late.status_code == 401 and late.json()["reason"] == "token_revoked"


async def test_a_process_that_just_started_refuses_what_was_revoked_before_from_its_first_request(
    store: Store,
) -> None:
    """Regression: start() only scheduled the sync loop, whose first load came after the subscription (up to a
    poll interval later); a worker that had just (re)started served its first requests with an empty list, so a
    logged-out access token got a 200 there (I3)."""
    await Denylist(store).deny("revoked-earlier", time.time() + 60)  # another worker, before this one started
    denylist = Denylist(store)
    await denylist.start()
    try:
        assert "revoked-earlier" in denylist
    finally:
        await denylist.close()


async def test_a_logged_out_token_stays_refused_after_a_reload_that_raises_the_leeway(tmp_path: Path) -> None:
    """Regression (I3): entries were dated exp + the leeway of the config serving at the logout; a reload that
    raised tokens.leeway made verification accept the token longer than it stayed refused: 200 again."""
    now = [time.time()]
    secret = "denylist-tests-secret-0123456789abcdef"
    config: dict[str, Any] = {
        "server": {"access_log": False, "watch_config": False},
        "tokens": {"algorithms": ["HS256"], "secret": secret, "leeway": 5},
        "cookies": {"secure": False},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    app = create_app(parse_config(config), forwarder=RecordingUpstream(), clock=lambda: now[0], config_path=str(path))
    token = jwt.encode({"sub": "alice", "exp": int(now[0] + 10), "jti": "j-1"}, secret, algorithm="HS256")
    bearer = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        assert (await client.post("/.gateway/logout", headers=bearer)).status_code == 204
        config["tokens"]["leeway"] = 120  # clocks found to drift: the operator raises the leeway
        path.write_text(yaml.safe_dump(config))
        assert await app.reload("test")
        now[0] += 60  # past exp + the old leeway, within the new one: the token itself verifies
        late = await client.get("/x", headers=bearer)
    assert late.status_code == 401 and late.json()["reason"] == "token_revoked"


class ListDown(MemoryStore):
    """The shared list cannot be read while ``down`` (the store unreachable when a worker starts)."""

    down = False

    async def members(self, key: str, now: float) -> dict[str, float]:
        if self.down:
            raise StoreError("store unreachable")
        return await super().members(key, now)


async def test_a_worker_that_starts_while_the_store_is_down_does_not_pass_what_it_cannot_know_is_revoked() -> None:
    """Regression (I3): a worker (re)started during a store outage (uvicorn replaces a dead worker) served with an
    empty denylist: every access token logged out before the outage got a 200 there until the store answered."""
    secret = "denylist-tests-secret-0123456789abcdef"
    config = {
        "server": {"access_log": False},
        "tokens": {"algorithms": ["HS256"], "secret": secret},
        "cookies": {"secure": False},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
    }
    store = ListDown("gw:", clock=time.time)
    exp = int(time.time() + 300)
    await Denylist(store).deny("logged-out", exp + 300)  # before the outage, by another worker
    store.down = True
    app = create_app(parse_config(config), forwarder=RecordingUpstream(), store=store)
    await app.startup()
    try:
        revoked, fine = (
            {"Authorization": "Bearer " + jwt.encode({"sub": "alice", "exp": exp, "jti": jti}, secret, "HS256")}
            for jti in ("logged-out", "still-fine")
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            unknown = await client.get("/x", headers=revoked)
            assert unknown.status_code == 503 and unknown.json()["reason"] == "store_unavailable"
            store.down = False
            await until(lambda: "logged-out" in app.shared.denylist, "the list loaded once the store answers")
            late = await client.get("/x", headers=revoked)
            assert late.status_code == 401 and late.json()["reason"] == "token_revoked"
            assert (await client.get("/x", headers=fine)).status_code == 200
    finally:
        await app.shutdown()
