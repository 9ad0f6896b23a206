"""The store contract, run against MemoryStore and a real Redis; plus RedisStore failure modes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from support.waiting import announcements_arrive, until

from gateway.config import SentinelConfig
from gateway.errors import StoreError
from gateway.store import MemoryStore, RecordKeys, Store, open_store
from gateway.store.redis import RedisStore

TTL = 0.2  # tests about expiry sleep past it (TTL + 0.1 s): the wait is what they test


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(f"gwtest:{uuid4().hex[:8]}:")
        return
    if request.param == "cluster":
        # Throwaway servers of this session: a unique prefix keeps tests apart, no cleanup needed.
        redis_store = RedisStore.for_cluster(request.getfixturevalue("redis_cluster_url"), f"gwtest:{uuid4().hex[:8]}:")
    elif request.param == "sentinel":
        setup = request.getfixturevalue("redis_sentinel")
        sentinel = SentinelConfig(hosts=tuple(setup.hosts), master=setup.master)
        redis_store = RedisStore.for_sentinel(sentinel, f"gwtest:{uuid4().hex[:8]}:")
    else:
        redis_store = RedisStore(request.getfixturevalue("redis_url"), request.getfixturevalue("key_prefix"))
    try:
        yield redis_store
    finally:
        await redis_store.close()


# --- values ---


async def test_get_set_and_expiry(store: Store) -> None:
    assert await store.get("result:{a}") is None
    await store.set("result:{a}", b"one", TTL)
    assert await store.get("result:{a}") == b"one"
    await store.set("result:{a}", b"two", TTL)
    assert await store.get("result:{a}") == b"two"
    await asyncio.sleep(TTL + 0.1)
    assert await store.get("result:{a}") is None


async def test_delete(store: Store) -> None:
    await store.set("k", b"v", 5)
    await store.delete("k")
    assert await store.get("k") is None
    await store.delete("k")  # deleting a missing key is not an error


async def test_set_if_absent(store: Store) -> None:
    assert await store.set_if_absent("k", b"first", TTL)
    assert not await store.set_if_absent("k", b"second", TTL)
    assert await store.get("k") == b"first"
    await asyncio.sleep(TTL + 0.1)
    assert await store.set_if_absent("k", b"third", TTL)
    assert await store.get("k") == b"third"


async def test_binary_values_round_trip(store: Store) -> None:
    value = bytes(range(256))
    await store.set("k", value, 5)
    assert await store.get("k") == value


async def test_replace_writes_only_over_the_value_read(store: Store) -> None:
    """Compare-and-set, for session records (gateway.sessions): a stale writer loses and the value stays."""
    await store.set("sess:{a}", b"v1", 5)
    assert await store.replace("sess:{a}", b"v1", b"v2", TTL)
    assert not await store.replace("sess:{a}", b"v1", b"stale", 5)  # read before v2: loses
    assert await store.get("sess:{a}") == b"v2"
    assert not await store.replace("sess:{missing}", b"v1", b"v2", 5)  # never creates
    assert await store.get("sess:{missing}") is None
    await asyncio.sleep(TTL + 0.1)  # the new ttl applies
    assert await store.get("sess:{a}") is None


# --- locks ---


async def test_acquire_is_exclusive(store: Store) -> None:
    results = await asyncio.gather(*(store.acquire("lock:{h}", f"owner-{i}", 5) for i in range(20)))
    assert results.count(True) == 1
    assert not await store.acquire("lock:{h}", "late", 5)


async def test_lease_expiry_lets_another_acquire(store: Store) -> None:
    assert await store.acquire("lock:{h}", "a", TTL)
    assert not await store.acquire("lock:{h}", "b", TTL)
    await asyncio.sleep(TTL + 0.1)
    assert await store.acquire("lock:{h}", "b", TTL)


async def test_renew_only_by_owner(store: Store) -> None:
    assert await store.acquire("lock:{h}", "a", TTL)
    assert not await store.renew("lock:{h}", "b", 5)
    assert await store.renew("lock:{h}", "a", 1.0)
    await asyncio.sleep(TTL + 0.1)
    assert not await store.acquire("lock:{h}", "b", TTL), "renewed lease must outlive the original one"


async def test_renew_after_expiry_fails(store: Store) -> None:
    assert await store.acquire("lock:{h}", "a", TTL)
    await asyncio.sleep(TTL + 0.1)
    assert not await store.renew("lock:{h}", "a", 5)
    assert await store.acquire("lock:{h}", "b", 5)


async def test_release_only_by_owner(store: Store) -> None:
    assert await store.acquire("lock:{h}", "a", 5)
    assert not await store.release("lock:{h}", "b")
    assert not await store.acquire("lock:{h}", "b", 5), "a foreign release must not free the lock"
    assert await store.release("lock:{h}", "a")
    assert not await store.release("lock:{h}", "a")
    assert await store.acquire("lock:{h}", "b", 5)


async def test_late_release_never_deletes_next_owners_lock(store: Store) -> None:
    assert await store.acquire("lock:{h}", "a", TTL)
    await asyncio.sleep(TTL + 0.1)
    assert await store.acquire("lock:{h}", "b", 5)
    assert not await store.release("lock:{h}", "a")
    assert not await store.renew("lock:{h}", "a", 5)
    assert not await store.acquire("lock:{h}", "c", 5)
    assert await store.release("lock:{h}", "b")


# --- announcements ---


async def test_wait_woken_by_set_notify(store: Store) -> None:
    await announcements_arrive(store)

    async def writer() -> None:
        await asyncio.sleep(0.05)
        await store.set("result:{h}", b"tokens", 5, notify=True)

    async with store.watch("result:{h}") as waiter:
        task = asyncio.create_task(writer())
        started = time.monotonic()
        assert await waiter.wait(2.0)
        assert time.monotonic() - started < 1.0
        await task
    assert await store.get("result:{h}") == b"tokens"


async def test_wait_woken_by_release(store: Store) -> None:
    assert await store.acquire("lock:{h}", "a", 5)
    await announcements_arrive(store)
    waiting = asyncio.create_task(store.wait("lock:{h}", 2.0))
    # One loop step: with the subscription up, wait() registers its interest before it first suspends.
    await asyncio.sleep(0)
    assert not waiting.done()
    assert await store.release("lock:{h}", "a")
    assert await asyncio.wait_for(waiting, 1.0)


async def test_wait_times_out_without_announcement(store: Store) -> None:
    await store.set("result:{h}", b"quiet", 5)  # without notify: no announcement
    await store.set("result:{other}", b"x", 5, notify=True)  # another key's announcement
    started = time.monotonic()
    assert not await store.wait("result:{h}", TTL)
    assert TTL - 0.05 <= time.monotonic() - started < TTL + 0.5


async def test_failed_release_does_not_announce(store: Store) -> None:
    assert await store.acquire("lock:{h}", "a", 5)
    async with store.watch("lock:{h}") as waiter:
        assert not await store.release("lock:{h}", "b")
        assert not await waiter.wait(TTL)


async def test_register_then_check_does_not_miss_announcement(store: Store) -> None:
    await announcements_arrive(store)
    async with store.watch("result:{h}") as waiter:
        assert await store.get("result:{h}") is None
        # The announcement lands between the caller's check and its wait.
        await store.set("result:{h}", b"tokens", 5, notify=True)
        await asyncio.sleep(0.1)  # the announcement arrives before wait() is called: it is remembered
        assert await waiter.wait(1.0)


async def test_one_notify_wakes_many_waiters(store: Store) -> None:
    await announcements_arrive(store)
    registered = 0
    all_registered = asyncio.Event()

    async def wait_one() -> bool:
        nonlocal registered
        async with store.watch("result:{h}") as waiter:
            registered += 1
            if registered == 100:
                all_registered.set()
            return await waiter.wait(3.0)

    tasks = [asyncio.create_task(wait_one()) for _ in range(100)]
    await asyncio.wait_for(all_registered.wait(), 3.0)
    started = time.monotonic()
    await store.set("result:{h}", b"tokens", 5, notify=True)
    assert await asyncio.gather(*tasks) == [True] * 100
    assert time.monotonic() - started < 1.0


# --- expiring sets (the denylist) ---


async def test_member_visible_until_its_expiry(store: Store) -> None:
    now = time.time()
    await store.add_member("denylist", "jti-short", now + 0.3)
    await store.add_member("denylist", "jti-long", now + 30)
    found = await store.members("denylist", now)  # asked about the moment of writing: a slow write cannot hide one
    assert set(found) == {"jti-short", "jti-long"}
    assert found["jti-short"] == pytest.approx(now + 0.3, abs=0.01)
    assert found["jti-long"] == pytest.approx(now + 30, abs=0.01)
    # Asked about a later moment, the short one is gone while the long one stays.
    assert set(await store.members("denylist", now + 1)) == {"jti-long"}
    await asyncio.sleep(0.4)
    assert set(await store.members("denylist", time.time())) == {"jti-long"}


async def test_member_already_expired_is_not_visible(store: Store) -> None:
    await store.add_member("denylist", "old", time.time() - 1)
    assert await store.members("denylist", time.time()) == {}
    assert await store.members("other-set", time.time()) == {}


async def test_readding_a_member_extends_it_never_shortens(store: Store) -> None:
    now = time.time()
    await store.add_member("denylist", "jti", now + 0.2)
    await store.add_member("denylist", "jti", now + 30)
    await store.add_member("denylist", "jti", now + 0.1)  # an earlier expiry does not shorten it
    await asyncio.sleep(0.3)
    found = await store.members("denylist", time.time())
    assert found == {"jti": pytest.approx(now + 30, abs=0.01)}


async def test_all_members_expired_then_a_new_one_is_visible(store: Store) -> None:
    await store.add_member("denylist", "first", time.time() + 0.1)
    await asyncio.sleep(0.2)
    await store.add_member("denylist", "second", time.time() + 30)
    assert set(await store.members("denylist", time.time())) == {"second"}


async def test_add_member_wakes_a_watcher_of_the_key(store: Store) -> None:
    await announcements_arrive(store)
    async with store.watch("denylist") as waiter:
        started = time.monotonic()
        await store.add_member("denylist", "jti", time.time() + 30)
        assert await waiter.wait(2.0)
        assert time.monotonic() - started < 1.0
    async with store.watch("other") as waiter:
        await store.add_member("denylist", "jti2", time.time() + 30)
        assert not await waiter.wait(TTL)


# --- redis across processes ---


async def test_notify_reaches_waiter_of_another_store(redis_url: str, key_prefix: str) -> None:
    first, second = RedisStore(redis_url, key_prefix), RedisStore(redis_url, key_prefix)
    try:
        await first.start()
        await second.start()
        async with first.watch("result:{h}") as waiter:
            await second.set("result:{h}", b"tokens", 5, notify=True)
            assert await waiter.wait(2.0)
        assert await first.get("result:{h}") == b"tokens"

        assert await second.acquire("lock:{h}", "b", 5)
        async with first.watch("lock:{h}") as waiter:
            assert await second.release("lock:{h}", "b")
            assert await waiter.wait(2.0)
    finally:
        await first.close()
        await second.close()


async def test_members_shared_between_redis_stores(redis_url: str, key_prefix: str) -> None:
    first, second = RedisStore(redis_url, key_prefix), RedisStore(redis_url, key_prefix)
    try:
        await first.start()
        await second.start()
        async with first.watch("denylist") as waiter:
            await second.add_member("denylist", "from-second", time.time() + 30)
            assert await waiter.wait(2.0)
        assert set(await first.members("denylist", time.time())) == {"from-second"}
        await first.add_member("denylist", "from-first", time.time() + 30)
        assert set(await second.members("denylist", time.time())) == {"from-second", "from-first"}
    finally:
        await first.close()
        await second.close()


async def test_expiring_set_key_does_not_outlive_its_members(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await store.add_member("denylist", "a", time.time() + 0.2)
        ttl_ms = await client.pttl(f"{key_prefix}denylist")
        assert 0 < ttl_ms <= 1200  # the key expires with its last member: no unbounded growth
        await store.add_member("denylist", "b", time.time() + 60)
        assert 50_000 < await client.pttl(f"{key_prefix}denylist") <= 61_000
    finally:
        await client.aclose()
        await store.close()


async def test_first_watch_is_subscribed_before_caller_checks(redis_url: str, key_prefix: str) -> None:
    """Regression: entering watch() must wait for the SUBSCRIBE to take effect, or an early notify is lost."""
    publisher = RedisStore(redis_url, key_prefix)
    fresh = RedisStore(redis_url, key_prefix)
    try:
        await publisher.ping()  # warm connection: its notify lands faster than a cold subscribe
        async with fresh.watch("result:{h}") as waiter:
            await publisher.set("result:{h}", b"tokens", 5, notify=True)
            assert await waiter.wait(1.0)
    finally:
        await fresh.close()
        await publisher.close()


async def test_other_prefix_is_not_announced(redis_url: str, key_prefix: str) -> None:
    ours, theirs = RedisStore(redis_url, key_prefix), RedisStore(redis_url, key_prefix + "other:")
    try:
        async with ours.watch("result:{h}") as waiter:
            await theirs.set("result:{h}", b"x", 5, notify=True)
            assert not await waiter.wait(TTL)
    finally:
        await ours.close()
        await theirs.close()


async def test_keys_are_prefixed(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await store.set("result:{h}", b"v", 5)
        assert await client.get(f"{key_prefix}result:{{h}}") == b"v"
    finally:
        await client.aclose()
        await store.close()


# --- redis failures ---


async def test_unreachable_redis_fails_fast(closed_port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{closed_port}/0", "gwtest:")
    try:
        for call in (store.get("k"), store.acquire("lock:{h}", "a", 5), store.ping()):
            started = time.monotonic()
            with pytest.raises(StoreError):
                await call
            assert time.monotonic() - started < 3.0
    finally:
        await store.close()


async def test_server_error_message_carries_no_value(redis_url: str, key_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(redis_url, key_prefix)
    try:
        await client.rpush(f"{key_prefix}k", "secret-token-value")
        with pytest.raises(StoreError) as info:
            await store.renew("k", "secret-token-value", 5)
        assert "secret-token-value" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__
    finally:
        await client.aclose()
        await store.close()


# --- open_store ---


async def test_open_store_by_scheme(redis_url: str) -> None:
    assert isinstance(open_store("memory://", "gw:"), MemoryStore)
    redis_store = open_store(redis_url, "gw:")
    assert isinstance(redis_store, RedisStore)
    await redis_store.close()
    with pytest.raises(ValueError):
        open_store("http://localhost", "gw:")


async def test_subscriber_reconnects_after_connection_drop(redis_url: str, key_prefix: str) -> None:
    name = f"{key_prefix.replace(':', '-')}sub"
    own = aioredis.Redis.from_url(redis_url, client_name=name)
    store = RedisStore.from_client(own, key_prefix)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await store.start()
        # Kill only this store's subscriber connection: REDIS_URL may point at a shared server.
        subscribers = [c for c in await client.client_list(_type="pubsub") if c["name"] == name]
        assert len(subscribers) == 1
        await client.client_kill_filter(_id=subscribers[0]["id"])

        async def subscribed_again() -> bool:  # the subscriber notices, backs off 0.1 s and subscribes again
            found = await client.client_list(_type="pubsub")
            return any(c["name"] == name and c["id"] != subscribers[0]["id"] and int(c["sub"]) > 0 for c in found)

        await until(subscribed_again, "this store's subscriber subscribed again", timeout=2.5)
        async with store.watch("result:{h}") as waiter:
            await client.publish(f"{key_prefix}notify", "result:{h}")
            assert await waiter.wait(2.0)
    finally:
        await store.close()
        await own.aclose()
        await client.aclose()


async def test_begin_attempt_repeated_after_a_lost_reply_answers_as_the_first_time(store: Store) -> None:
    """Regression (fault campaign): redis-py re-sends a script after a reset; the first run had recorded it."""
    keys = RecordKeys("root", "h")
    assert await store.acquire(keys.lock, "me", 5)
    first = await store.begin_attempt(keys, "me", "fence-1", 10, 60)
    assert first is not None
    assert await store.begin_attempt(keys, "me", "fence-1", 10, 60) == first
    assert await store.begin_attempt(keys, "me", "fence-2", 10, 60) is None  # another attempt is still refused


async def test_a_retry_that_never_left_does_not_clear_the_lost_attempt_it_took_over(store: Store) -> None:
    """Review finding: clearing the retry erased the record that the first send may have been redeemed."""
    keys = RecordKeys("root", "h")
    assert await store.acquire(keys.lock, "me", 5)
    assert await store.begin_attempt(keys, "me", "first", 10, 60) is not None
    assert await store.settle_attempt(keys, "first", "maybe")
    assert await store.begin_attempt(keys, "me", "retry", 10, 60, replace="first") is not None
    assert await store.settle_attempt(keys, "retry", "clear")  # the retry got a 503: it was not redeemed...
    attempt = (await store.read_record(keys)).attempt
    assert attempt is not None and attempt.state == "maybe" and attempt.retried  # ...but the first may have been


async def test_a_write_out_whose_attempt_is_gone_never_overwrites_another_redemption(store: Store) -> None:
    """Second review of 9656ee2: a missing attempt is written out, but not over another owner's recorded
    successor (its attempt expired or was evicted, the token's ``used`` is still there): that is a takeover."""
    keys = RecordKeys("root", "h")
    assert await store.acquire(keys.lock, "a", TTL)
    assert await store.begin_attempt(keys, "a", "fence-a", 10, TTL) is not None  # a's attempt is lost (expires)
    await asyncio.sleep(TTL + 0.1)
    assert await store.acquire(keys.lock, "b", 5)
    assert await store.begin_attempt(keys, "b", "fence-b", 10, TTL) is not None
    assert await store.finish(keys, "fence-b", [(keys.result, b"b's", 60)], used=(b"succ-b", 60)) == "ok"
    await asyncio.sleep(TTL + 0.1)  # b's attempt gone too, its used record not
    assert await store.finish(keys, "fence-a", [(keys.result, b"a's", 60)], used=(b"succ-a", 60)) == "superseded"
    record = await store.read_record(keys)
    assert (record.used, record.result) == (b"succ-b", b"b's")


async def test_a_write_out_whose_attempt_is_gone_repeated_after_a_lost_reply_answers_ok(store: Store) -> None:
    keys = RecordKeys("root", "h")
    assert await store.acquire(keys.lock, "a", 5)
    for _ in range(2):  # the store lost the attempt (restarted empty): written, and the repeat is no takeover
        assert await store.finish(keys, "fence-a", [(keys.result, b"a's", 60)], used=(b"succ-a", 60)) == "ok"
    assert (await store.read_record(keys)).used == b"succ-a"


async def test_an_attempt_recorded_again_after_its_owner_cleared_it_is_refused(store: Store) -> None:
    """Second review of c23220c: the first copy of begin_attempt ran, the owner timed out and cleared it
    (deleted), then a second copy (redis-py's retry) ran late: it must not leave a pending attempt behind."""
    keys = RecordKeys("root", "h")
    assert await store.acquire(keys.lock, "me", 5)
    assert await store.begin_attempt(keys, "me", "fence-1", 10, 60) is not None
    assert await store.settle_attempt(keys, "fence-1", "clear")
    assert await store.begin_attempt(keys, "me", "fence-1", 10, 60) is None
    assert (await store.read_record(keys)).attempt is None
    assert await store.begin_attempt(keys, "me", "fence-2", 10, 60) is not None  # a new attempt is not blocked
