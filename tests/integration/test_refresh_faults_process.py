"""Refresh under single faults the continuity tests do not cover, against real processes.

`gateway serve --workers 2`, a redis-server of the test's own (so that it may be restarted, empty),
and the rotating test IdP, whose ledger tells whether a refresh token was ever presented twice (I1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from support.faultproxy import FaultProxy
from support.redis_servers import RedisServer, start_redis
from support.servers import IdPProcess, ServerProcess, set_cookies, start_idp
from test_continuity_process import assert_one_redemption_each, at_the_idp, expired, serve, sha, via
from test_refresh_process import ACCESS, IDP_SECRET, REFRESH, cookie_header

from gateway.store import lua


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture(autouse=True)
def healthy_idp(idp: IdPProcess) -> Iterator[None]:
    idp.reset()
    yield
    idp.reset()


@pytest.fixture
def own_redis() -> Iterator[list[RedisServer]]:
    """A redis-server of this test's own, in a list: ``restart`` replaces it by an empty one on the same port."""
    servers = [start_redis()]
    try:
        yield servers
    finally:
        servers[-1].stop()


def restart(servers: list[RedisServer]) -> None:
    """Stop the redis-server and start an empty one on its port (no persistence: every key is gone)."""
    port = servers[-1].port
    servers[-1].stop()
    servers.append(RedisServer(lambda port: ["--port", str(port), "--save", "", "--appendonly", "no"], port=port))


def test_redis_restarting_empty_during_the_idp_call_never_resends_the_token(
    idp: IdPProcess, upstream: ServerProcess, own_redis: list[RedisServer]
) -> None:
    """The owner's write-out found its attempt gone (wiped, not taken over), took it for another worker's,
    revoked the successor it had just been given and redeemed the old token again: the IdP saw reuse and
    revoked the session, and the user was logged out."""
    with serve(idp, upstream, own_redis[-1].url) as gw:
        session = expired(idp)
        idp.behaviour(latency=1.5)

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(timeout=30) as client:
                cookie = {"Cookie": cookie_header(session["access"], session["refresh"])}
                owner = asyncio.ensure_future(client.get(f"{gw.url}/a", headers=cookie))
                await at_the_idp(idp)  # the owner's call is in flight (the IdP answers after 1.5 s)
                await asyncio.to_thread(restart, own_redis)
                return await owner

        first = asyncio.run(scenario())
        assert first.status_code == 200, first.text
        jar = set_cookies(first)
        assert jar[REFRESH].value and jar[REFRESH]["max-age"] != "0"
        assert_one_redemption_each(idp)
        again = httpx.get(f"{gw.url}/b", headers={"Cookie": f"{REFRESH}={jar[REFRESH].value}"}, timeout=30)
        assert again.status_code == 200, again.text


def test_a_logout_during_a_store_outage_ends_a_session_whose_rotation_is_recorded_late(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> None:
    """Redis went down during the IdP call for longer than a request waits: the request got the successor,
    whose rotation (family link, write-out) went on in the background. The user logged out with it before
    Redis was back; the logout, retried in the background too, found no family for the successor and ended
    one named after it. Then the rotation landed, in the family nobody ended: the logged-out refresh token
    still refreshed (with an IdP that ignores revocation) and got a 200 (I3)."""
    parts = urlsplit(redis_url)
    with (
        FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy,
        serve(idp, upstream, via(proxy, redis_url), revocation_endpoint=None) as gw,
    ):
        session = expired(idp)
        idp.behaviour(latency=1.0)

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                cookie = {"Cookie": cookie_header(session["access"], session["refresh"])}
                owner = asyncio.ensure_future(client.get(f"{gw.url}/a", headers=cookie))
                await at_the_idp(idp)
                await asyncio.to_thread(proxy.down)
                first = await owner  # after SHARE_RETRY (10 s): the write-out goes on in the background
                jar = set_cookies(first)
                held = {"Cookie": f"{ACCESS}={jar[ACCESS].value}; {REFRESH}={jar[REFRESH].value}", "Origin": gw.url}
                logout = await client.post(f"{gw.url}/.gateway/logout", headers=held)
                # The logout's retry reads the family of the successor before the rotation's link lands.
                await asyncio.to_thread(proxy.add_rule, r"^SET \S*family:", "delay_command", delay=1.5, times=None)
                await asyncio.to_thread(proxy.heal)
                await asyncio.sleep(4.0)  # both background writes have landed
                return first, logout

        first, logout = asyncio.run(scenario())
        assert first.status_code == 200, first.text
        assert logout.status_code == 204
        assert "successor recorded late" in gw.log()
        jar = set_cookies(first)
        copy = httpx.get(f"{gw.url}/b", headers={"Cookie": f"{REFRESH}={jar[REFRESH].value}"}, timeout=30)
        assert copy.status_code == 401, copy.text
        assert copy.json()["reason"] == "session_ended"


def test_a_successor_verified_late_on_a_grace_hit_is_refused_once_the_session_ends(
    upstream: ServerProcess, redis_url: str
) -> None:
    """The IdP's clock ran ahead: its new access token was not valid yet when the rotation was written out,
    so it was not counted among the family's tokens. A moment later a copy of the old cookie got it on a
    grace hit (it verified by then), still uncounted; when reuse ended the family, that access token was
    not refused and kept getting 200s until it expired (I3)."""
    with start_idp(secret=IDP_SECRET, clock_skew=2) as idp, serve(idp, upstream, redis_url, grace_period=3) as gw:
        session = idp.issue("alice", access_ttl=-60)
        old = {"Cookie": cookie_header(None, session["refresh"])}
        first = httpx.get(f"{gw.url}/a", headers=old, timeout=30)
        assert first.status_code == 503 and first.json()["reason"] == "idp_token_unverified", first.text
        time.sleep(2.2)  # the IdP's tokens are valid here now; the rotation is 2.2 s old, within grace
        copy = httpx.get(f"{gw.url}/b", headers=old, timeout=30)
        assert copy.status_code == 200, copy.text
        access = set_cookies(copy)[ACCESS].value
        time.sleep(1.0)  # past the grace period
        replay = httpx.get(f"{gw.url}/c", headers=old, timeout=30)
        assert replay.status_code == 401 and replay.json()["reason"] == "reuse", replay.text
        time.sleep(1.2)  # every worker has the family's access tokens on its denylist
        after = httpx.get(f"{gw.url}/d", headers={"Cookie": f"{ACCESS}={access}"}, timeout=30)
        assert after.status_code == 401, after.text
        assert idp.stats()["refresh_calls"] == 1


@pytest.mark.parametrize("remembered", [False, True], ids=["from_the_store", "from_memory"])
def test_the_token_before_last_within_grace_gets_the_newest_tokens_not_a_superseded_successor(
    upstream: ServerProcess, redis_url: str, remembered: bool
) -> None:
    """Access tokens due within the grace period (4 s tokens are due at half their life): A was rotated to B,
    then B to C, while A's grace still ran. A request that left the browser with A and arrived late got a grace
    hit with B, already superseded (from the store, or from the worker's memory of an earlier grace hit); the
    browser kept those cookies, and its next request after B's grace period was reuse: logged out (I2)."""
    with (
        start_idp(secret=IDP_SECRET, access_ttl=4) as idp,
        serve(idp, upstream, redis_url, workers=1, grace_period=3) as gw,
    ):
        session = idp.issue("alice", access_ttl=-60)
        a = {"Cookie": cookie_header(session["access"], session["refresh"])}
        b = set_cookies(httpx.get(f"{gw.url}/1", headers=a, timeout=30))
        if remembered:  # a grace hit the worker remembers for A's grace period
            assert set_cookies(httpx.get(f"{gw.url}/1", headers=a, timeout=30))[REFRESH].value == b[REFRESH].value
        time.sleep(2.2)  # B is due; A's grace (3 s) still runs
        with_b = {"Cookie": f"{ACCESS}={b[ACCESS].value}; {REFRESH}={b[REFRESH].value}"}
        c = set_cookies(httpx.get(f"{gw.url}/2", headers=with_b, timeout=30))
        assert c[REFRESH].value != b[REFRESH].value
        late = httpx.get(f"{gw.url}/3", headers=a, timeout=30)
        assert late.status_code == 200, late.text
        kept = set_cookies(late)
        assert kept[REFRESH].value == c[REFRESH].value
        time.sleep(3.5)  # the browser kept what the late request set, and idled past every grace period
        with_kept = {"Cookie": f"{ACCESS}={kept[ACCESS].value}; {REFRESH}={kept[REFRESH].value}"}
        back = httpx.get(f"{gw.url}/4", headers=with_kept, timeout=30)
        assert back.status_code == 200, back.text
        assert idp.stats()["refresh_calls"] == 3  # A, B, and C once it was due


def test_an_attempt_record_run_late_by_a_slow_store_is_never_taken_for_a_lost_answer(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> None:
    """Redis slow on the network: the owner's record of its attempt went unanswered past the client's timeout,
    so it sent nothing and cleared the attempt on another connection, where nothing was there yet; the record
    ran afterwards, before the lock's release. The pending attempt outlived its deadline and the next request
    took it for an IdP answer lost: the session ended (refresh_lost) although the IdP never saw the token."""
    parts = urlsplit(redis_url)
    with (
        FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy,
        serve(idp, upstream, via(proxy, redis_url), workers=1) as gw,
    ):
        session = expired(idp)
        cookie = {"Cookie": cookie_header(session["access"], session["refresh"])}
        with redis.Redis.from_url(redis_url) as direct:  # loaded already: the delayed call runs, not NOSCRIPT
            direct.script_load(lua.BEGIN_ATTEMPT)
        begin = proxy.add_rule(f"^EVALSHA {sha(lua.BEGIN_ATTEMPT)}", "delay_command", delay=2.5)
        release = proxy.add_rule(f"^EVALSHA {sha(lua.RELEASE)}", "delay_command", delay=1.0)
        slow = httpx.get(f"{gw.url}/a", headers=cookie, timeout=60)
        assert slow.status_code == 503, slow.text
        assert proxy.matched(begin) == 1 and proxy.matched(release) == 1
        assert idp.stats()["refresh_calls"] == 0
        time.sleep(12.0)  # past the attempt's deadline (2 + 5 + 2 × 1 + 1 s)
        back = httpx.get(f"{gw.url}/b", headers=cookie, timeout=60)
        assert back.status_code == 200, back.text
        assert set_cookies(back)[REFRESH].value
        assert_one_redemption_each(idp)
