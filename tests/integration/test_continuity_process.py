"""Session continuity under faults (issue 12): one test per failure found, against real processes.

`gateway serve --workers 2` talks to a real redis-server through the fault proxy
(tests/support/faultproxy.py), which delays, drops or resets the reply to chosen commands; the
test IdP loses answers after redeeming, ignores revocations, rolls its keys over. What is
asserted is what a user or the IdP notices: statuses, cookies, and the IdP's per-token
redemption ledger (invariant I1: no refresh token is presented twice). Most tests run in both session
modes (``mode``: the refresh token in a sealed cookie, or in a server-side session record; see
support.sessionmodes); session-mode twins of the others are in test_session_mode_process.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml
from support.faultproxy import FaultProxy
from support.sealed import refresh_token_in
from support.servers import GatewayProcess, IdPProcess, ServerProcess, set_cookies, start_gateway, start_idp
from support.sessionmodes import MODES, Browser, cleared, handed_out, kept, rotated, with_mode
from support.waiting import until, wait_until
from support.workers import WorkerClients
from test_refresh_process import ACCESS, IDP_SECRET, REFRESH, cookie_header, gateway_config

from gateway.sealing import Sealer
from gateway.store import RecordKeys, lua

STORE_SECRET = "store-secret-for-tests"


def sha(script: str) -> str:
    """What redis-py's EVALSHA names a registered script by."""
    return hashlib.sha1(script.encode()).hexdigest()


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
def proxy(redis_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(redis_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy


def via(proxy: FaultProxy, redis_url: str) -> str:
    return proxy.redis_url(int(urlsplit(redis_url).path.strip("/") or 0))


def serve(
    idp: IdPProcess, upstream: ServerProcess, store_url: str, *, workers: int = 2, tokens: dict[str, Any] | None = None,
    mode: str = "cookie", **refresh: Any,
) -> GatewayProcess:  # fmt: skip
    """A gateway in session ``mode`` (support.sessionmodes: "cookie" or "server")."""
    prefix = f"gwtest:{os.urandom(4).hex()}:"
    config = gateway_config(idp, upstream, store_url, prefix, **({"lock_lease": 1, "grace_period": 3} | refresh))
    config["tokens"] |= tokens or {}
    gateway = start_gateway(with_mode(config, mode), workers=workers)
    try:  # every worker past its startup (its first JWKS fetch): a test that then changes the IdP races none
        wait_until(lambda: gateway.log().count("Application startup complete.") >= workers, "every worker started")
    except BaseException:
        gateway.stop()
        raise
    return gateway


mode_param = pytest.mark.parametrize("mode", MODES)


def expired(idp: IdPProcess, user: str = "alice") -> dict[str, str]:
    return idp.issue(user, access_ttl=-60)


def get(gw: GatewayProcess, access: str | None, refresh: str | None, **headers: str) -> httpx.Response:
    return httpx.get(f"{gw.url}/x", headers={"Cookie": cookie_header(access, refresh), **headers}, timeout=30)


async def storm(url: str, cookie: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)  # new connections: every worker
    async with httpx.AsyncClient(limits=limits, timeout=40) as client:
        return await asyncio.gather(*(client.get(url, headers={"Cookie": cookie}) for _ in range(count)))


def store_key(gw: GatewayProcess, key: str) -> str:
    """``key`` as the gateway names it in Redis (under its config's key prefix)."""
    return str(yaml.safe_load(Path(gw.config_path).read_text())["store"]["key_prefix"]) + key


def let_go(gw: GatewayProcess, redis_url: str) -> bool:
    """No refresh lock and no attempt record of this gateway is left in Redis: every refresh has let go.
    A cleared attempt's fence stays behind for a while (``cleared``, read as no attempt): not an attempt."""
    with redis.Redis.from_url(redis_url) as direct:  # not through the proxy
        attempts = [direct.hget(key, "state") for key in direct.scan_iter(match=store_key(gw, "attempt:*"))]
        return not any(direct.scan_iter(match=store_key(gw, "lock:*"))) and all(a == b"cleared" for a in attempts)


async def at_the_idp(idp: IdPProcess, calls: int = 1) -> None:
    """Until the IdP has received ``calls`` refresh requests (counted on arrival, before its latency)."""
    await until(lambda: asyncio.to_thread(lambda: idp.stats()["refresh_calls"] >= calls), "a refresh at the IdP")


def assert_one_redemption_each(idp: IdPProcess) -> None:
    """I1, from the IdP's own ledger: no refresh token was ever presented twice."""
    counts = idp.redemption_counts()
    assert counts and max(counts.values()) == 1, idp.ledger()
    assert not [e for e in idp.ledger() if e["event"] == "reused"], idp.ledger()


def assert_cleared(response: httpx.Response) -> None:
    jar = set_cookies(response)
    assert jar[ACCESS]["max-age"] == "0" and jar[REFRESH]["max-age"] == "0"


# --- 1. Redis fails during an IdP outage -------------------------------------------------------------


@mode_param
def test_attempt_marker_whose_delete_failed_is_cleared_and_the_session_goes_on(
    idp: IdPProcess, upstream: ServerProcess, proxy: FaultProxy, redis_url: str, mode: str
) -> None:
    """Failure 1a: IdP down (not redeemed), and the delete of the attempt marker fails on Redis."""
    with serve(idp, upstream, via(proxy, redis_url), mode=mode) as gw:
        tab = Browser(gw, mode, redis_url).start(expired(idp))
        idp.behaviour(fail="503", fail_count=1)
        rule = proxy.add_rule(f"^EVALSHA {sha(lua.SETTLE_ATTEMPT)}", "reset_before", times=2)
        down = tab.get()
        assert down.status_code == 503 and kept(down)
        assert proxy.matched(rule) >= 1
        time.sleep(2.5)  # both are back; the shared failure (2 s) is over
        up = tab.get()
        assert up.status_code == 200, up.text
        assert rotated(up, mode)
        assert_one_redemption_each(idp)


@mode_param
def test_attempt_marker_whose_reply_was_lost_never_becomes_a_logout(
    idp: IdPProcess, upstream: ServerProcess, proxy: FaultProxy, redis_url: str, mode: str
) -> None:
    """Failure 1b: the marker reached Redis but its reply was lost; the IdP was never called."""
    with serve(idp, upstream, via(proxy, redis_url), mode=mode) as gw:
        tab = Browser(gw, mode, redis_url).start(expired(idp))
        rule = proxy.add_rule(f"^EVALSHA {sha(lua.BEGIN_ATTEMPT)}", "drop_reply")
        lost = tab.get()
        assert lost.status_code == 503 and kept(lost)
        assert proxy.matched(rule) == 1 and idp.stats()["refresh_calls"] == 0
        wait_until(lambda: let_go(gw, redis_url), "the failed refresh cleared its attempt and released its lock")
        up = tab.get()
        assert up.status_code == 200 and rotated(up, mode), up.text
        assert idp.stats()["refresh_calls"] == 1
        assert_one_redemption_each(idp)


# --- 2. the lease ------------------------------------------------------------------------------------


@mode_param
@pytest.mark.parametrize("fault", ["one_renewal_stalls", "every_renewal_fails"])
def test_a_lease_renewal_that_stalls_or_fails_leaves_responses_in_agreement(
    idp: IdPProcess, upstream: ServerProcess, proxy: FaultProxy, redis_url: str, fault: str, mode: str
) -> None:
    """Failure 2: some responses rotated the cookies, others cleared them. Now one successor, shared by all."""
    with serve(idp, upstream, via(proxy, redis_url), mode=mode) as gw:
        tab = Browser(gw, mode, redis_url).start(expired(idp))
        idp.behaviour(latency=2.5)  # longer than the 1 s lease
        renew = f"^EVALSHA {sha(lua.RENEW)}"
        if fault == "one_renewal_stalls":
            rule = proxy.add_rule(renew, "delay_reply", delay=2.0)  # twice the lease
        else:
            rule = proxy.add_rule(renew, "reset_before", times=None)
        responses = asyncio.run(storm(f"{gw.url}/s", tab.cookie, 40))
        assert proxy.matched(rule) >= 1
        assert [r.status_code for r in responses] == [200] * 40
        assert len(handed_out(responses, tab)) == 1
        proxy.clear_rules()
        assert tab.keep(responses[0]) and tab.get().status_code == 200  # what the browser kept works
        assert idp.stats()["refresh_calls"] == 1
        assert_one_redemption_each(idp)


# --- 3. reuse ends the whole family --------------------------------------------------------------------


def test_reuse_of_an_old_token_ends_the_newest_too_with_an_idp_that_ignores_revocation(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> None:
    """Failure 3: R0 -> R1 -> R2, R0 replayed past grace: R2 kept working (SimpleJWT does not revoke)."""
    idp.behaviour(revoke_used=False, reuse_revokes_family=False)
    # Not even told: the gateway alone must end the session (I3, whatever the IdP does with revocation).
    with serve(idp, upstream, redis_url, grace_period=1, revocation_endpoint=None) as gw:
        r0 = expired(idp)
        first = get(gw, r0["access"], r0["refresh"])
        r1 = set_cookies(first)[REFRESH].value
        second = get(gw, None, r1)  # the access cookie gone: refresh again
        assert (first.status_code, second.status_code) == (200, 200)
        a2, r2 = set_cookies(second)[ACCESS].value, set_cookies(second)[REFRESH].value
        time.sleep(1.5)  # past the 1 s grace period: R0 is a replay now
        thief = get(gw, r0["access"], r0["refresh"])
        assert thief.status_code == 401 and thief.json()["reason"] == "reuse"
        assert_cleared(thief)
        owner = get(gw, None, r2)  # whoever holds the newest refresh token: over too
        assert owner.status_code == 401 and owner.json()["reason"] == "reuse"
        # The newest access token: refused on every worker within a second (each answers a part of the batch).
        with WorkerClients(gw) as workers:
            deadline = time.monotonic() + 3
            while True:
                served = workers.batch([("GET", f"{gw.url}/x", {"Authorization": f"Bearer {a2}"})] * 8)
                if {s.worker for s in served} == set(workers.pids) and all(
                    s.response.status_code != 200 for s in served
                ):
                    break
                assert time.monotonic() < deadline, "the family's live access token still works on some worker"
                time.sleep(0.1)
        for s in served:
            assert s.response.status_code == 401 and s.response.json()["reason"] == "token_revoked"
        assert idp.stats()["refresh_calls"] == 2  # the replay never reached the IdP
        assert_one_redemption_each(idp)
        # ...which would still honour R2: only the gateway stands between the thief's session and the app.
        raw_r2 = refresh_token_in(r2, REFRESH)  # the browser holds it sealed; the thief would need the secret
        at_idp = httpx.post(f"{idp.url}/token", data={"grant_type": "refresh_token", "refresh_token": raw_r2},
                            auth=("legacy-app", "demo-secret"))  # fmt: skip
        assert at_idp.status_code == 200


# --- 4 and 10. logout ------------------------------------------------------------------------------------


def test_a_logout_during_a_refresh_is_not_undone(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> None:
    """Failure 4: the owner's write-out restored the result; the old cookie got a grace hit afterwards."""
    # No revocation endpoint: the IdP redeems whatever it was asked, as one that ignores revocation would.
    with serve(idp, upstream, redis_url, revocation_endpoint=None) as gw:
        session = expired(idp)
        idp.behaviour(latency=1.0)

        async def race() -> tuple[httpx.Response, httpx.Response]:
            cookie = {"Cookie": cookie_header(session["access"], session["refresh"])}
            async with httpx.AsyncClient(timeout=30) as client:
                refreshing = asyncio.ensure_future(client.get(f"{gw.url}/x", headers=cookie))
                await at_the_idp(idp)  # the refresh is under way (the IdP answers after 1 s)
                logout = await client.post(f"{gw.url}/.gateway/logout", headers={**cookie, "Origin": gw.url})
                return await refreshing, logout

        refreshed, logout = asyncio.run(race())
        assert logout.status_code == 204
        assert refreshed.status_code == 401 and refreshed.json()["reason"] == "session_ended"
        assert_cleared(refreshed)
        again = get(gw, session["access"], session["refresh"])  # within grace
        assert again.status_code == 401 and again.json()["reason"] == "session_ended"
        assert [e["event"] for e in idp.ledger()] == ["redeemed"]


def test_the_superseded_cookie_after_a_logout_is_401_with_cookies_cleared(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str
) -> None:
    """Failure 10: a grace hit handed back the denylisted successor: 502, cookies kept."""
    with serve(idp, upstream, redis_url, grace_period=30) as gw:
        session = expired(idp)
        first = get(gw, session["access"], session["refresh"])
        jar = set_cookies(first)
        logout = httpx.post(
            f"{gw.url}/.gateway/logout",
            headers={"Cookie": cookie_header(jar[ACCESS].value, jar[REFRESH].value), "Origin": gw.url},
        )
        assert logout.status_code == 204
        other_tab = get(gw, session["access"], session["refresh"])
        assert other_tab.status_code == 401 and other_tab.json()["reason"] == "session_ended"
        assert_cleared(other_tab)


# --- 5. the IdP redeems, then its answer is lost ----------------------------------------------------------


@mode_param
@pytest.mark.parametrize(
    ("fail", "first_status"),
    [("redeem_then_hang", 503), ("redeem_then_reset", 503), ("redeem_then_504", 503), ("redeem_then_garbage", 503)],
)
def test_an_answer_lost_after_redemption_is_never_resent(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str, fail: str, first_status: int, mode: str
) -> None:
    """Failure 5: each of these counted as "not redeemed", the token was sent again, the IdP revoked the family."""
    with serve(idp, upstream, redis_url, timeout=1.5, mode=mode) as gw:
        tab = Browser(gw, mode, redis_url).start(expired(idp))
        idp.behaviour(fail=fail, fail_count=1)
        first = tab.get()
        assert first.status_code == first_status and kept(first)
        time.sleep(2.2)  # the failure is shared for 2 s, then the session ends cleanly
        later = tab.get(Accept="text/html")
        assert later.status_code == 302 and later.headers["location"].startswith("https://login.test/")
        assert cleared(later, mode)
        assert [e["event"] for e in idp.ledger()] == ["redeemed"]  # exactly one presentation, no reuse
        assert "event=refresh_lost" in gw.log() and "event=refresh_answer_lost" in gw.log()


@mode_param
def test_an_answer_lost_within_the_idps_reuse_window_is_asked_for_again(
    upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """Design point 7: Auth0, Okta and Keycloak accept a just-used token again for a while."""
    with start_idp(secret=IDP_SECRET, reuse_window=10) as idp:
        with serve(idp, upstream, redis_url, timeout=1.5, idp_reuse_window=10, mode=mode) as gw:
            tab = Browser(gw, mode, redis_url).start(expired(idp))
            idp.behaviour(fail="redeem_then_reset", fail_count=1)
            response = tab.get()
            assert response.status_code == 200 and rotated(response, mode)
            assert tab.get().status_code == 200  # the successor the retry brought is the session's now
            assert [e["event"] for e in idp.ledger()] == ["redeemed", "reused_in_window"]
            assert not any(f["revoked"] for f in idp.families())


# --- 6. the new access token cannot be verified yet ---------------------------------------------------------


@mode_param
def test_key_rollover_with_jwks_down_keeps_the_successor_and_recovers_without_another_idp_call(
    upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """Failure 6: a new kid while the JWKS is unreachable threw the valid successor away and ended the session."""
    with start_idp(algorithm="RS256") as idp:
        tokens = {"algorithms": ["RS256"], "secret": None, "jwks_url": f"{idp.url}/jwks"}
        with serve(idp, upstream, redis_url, tokens=tokens, mode=mode) as gw:
            session = expired(idp)
            tab = Browser(gw, mode, redis_url).start(session)
            idp.rotate_key()
            idp.behaviour(jwks="down")
            first = tab.get()
            assert first.status_code == 503 and first.headers["retry-after"]
            assert ACCESS not in set_cookies(first) and rotated(first, mode)
            successor = tab.refresh_token()  # kept: in the rotated refresh cookie, or in the record
            assert successor not in (None, session["refresh"])
            still = tab.drop_access().get()
            assert still.status_code == 503
            idp.behaviour(jwks="up")
            time.sleep(5.2)  # the gateway refetches a JWKS at most every 5 s
            back = tab.get()
            assert back.status_code == 200, back.text
            assert ACCESS in set_cookies(back) if mode == "cookie" else kept(back)
            assert tab.refresh_token() == successor
            assert idp.stats()["refresh_calls"] == 1
            assert_one_redemption_each(idp)


@mode_param
def test_an_idp_clock_ahead_of_ours_is_a_503_then_the_same_cookies_work(
    upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """Failure 6: tokens issued by a clock ahead of ours are not valid yet: keep them, try again."""
    with start_idp(secret=IDP_SECRET, clock_skew=3) as idp:
        with serve(idp, upstream, redis_url, mode=mode) as gw:
            session = idp.issue("alice", access_ttl=-60)
            tab = Browser(gw, mode, redis_url).start(session)
            first = tab.drop_access().get()  # a browser back after a while: the access cookie is gone
            assert first.status_code == 503 and ACCESS not in set_cookies(first) and rotated(first, mode)
            assert tab.refresh_token() not in (None, session["refresh"])
            time.sleep(3.2)  # the IdP's clock is 3 s ahead of ours: its tokens are valid here now
            back = tab.drop_access().get()
            assert back.status_code == 200, back.text
            assert idp.stats()["refresh_calls"] == 1


# --- 7 and 9. waiters and notifications -----------------------------------------------------------------------


def test_grace_shorter_than_the_lease_is_refused_by_gateway_check(tmp_path: Any) -> None:
    """Failure 7 (design point 4): the config that let a waiter outlive the result is refused, saying why."""
    config = {
        "tokens": {"algorithms": ["HS256"], "secret": IDP_SECRET},
        "store": {"url": "memory://"},
        "refresh": {"endpoint": "https://idp.example/token", "grace_period": 3, "lock_lease": 5},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 1
    assert "refresh.grace_period: 3 s is shorter than refresh.lock_lease (5 s)" in checked.stderr + checked.stdout


@mode_param
def test_waiters_without_notifications_find_the_result_within_a_short_grace_and_at_once(
    idp: IdPProcess, upstream: ServerProcess, proxy: FaultProxy, redis_url: str, mode: str
) -> None:
    """Failures 7 and 9: a waiter whose wake-up is lost slept a lease (and 2 s more per wait), found the
    result expired and declared reuse. Now it looks every 0.25 s."""
    proxy.add_rule("SUBSCRIBE", "blackhole_conn", times=None)  # no worker ever hears an announcement
    with serve(idp, upstream, via(proxy, redis_url), grace_period=1, lock_lease=1, mode=mode) as gw:
        tab = Browser(gw, mode, redis_url).start(expired(idp))
        idp.behaviour(latency=1.0)

        async def timed() -> list[tuple[float, httpx.Response]]:
            async def one(client: httpx.AsyncClient) -> tuple[float, httpx.Response]:
                started = time.monotonic()
                response = await client.get(f"{gw.url}/w", headers={"Cookie": cookie})
                return time.monotonic() - started, response

            cookie = tab.cookie
            limits = httpx.Limits(max_connections=30, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, timeout=30) as client:
                return await asyncio.gather(*(one(client) for _ in range(30)))

        results = asyncio.run(timed())
        assert [r.status_code for _, r in results] == [200] * 30
        assert len(handed_out([r for _, r in results], tab)) == 1
        assert max(elapsed for elapsed, _ in results) < 1.9  # IdP 1.0 s + one poll, not + 2 s + a lease
        assert idp.stats()["refresh_calls"] == 1


# --- 8. sealed values are bound to their keys ---------------------------------------------------------------


@mode_param
def test_a_sealed_value_copied_to_another_users_key_does_not_unseal(
    idp: IdPProcess, upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """Failure 8: someone with write access to Redis, but not the secret, hands Alice's tokens to Bob."""
    with serve(idp, upstream, redis_url, grace_period=30, mode=mode) as gw:
        prefix = store_key(gw, "")
        alice, bob = expired(idp, "alice"), expired(idp, "bob")
        alice_tab = Browser(gw, mode, redis_url).start(alice, {"sub": "alice"})
        bob_tab = Browser(gw, mode, redis_url).start(bob, {"sub": "bob"})
        assert alice_tab.get().status_code == 200
        sealer = Sealer(STORE_SECRET)
        a, b = sealer.token_hash(alice["refresh"]), sealer.token_hash(bob["refresh"])
        with redis.Redis.from_url(redis_url) as client:
            stolen = client.get(prefix + RecordKeys(a, a).result)
            assert stolen is not None
            client.set(prefix + RecordKeys(b, b).result, stolen, px=30_000)
        response = bob_tab.get()
        assert response.status_code == 503 and "alice" not in response.text
        assert kept(response)


# --- 11. short-lived access tokens ------------------------------------------------------------------------


@mode_param
def test_short_lived_tokens_with_default_settings_refresh_when_due_not_on_every_request(
    upstream: ServerProcess, redis_url: str, mode: str
) -> None:
    """Failure 11: 4 s tokens with leeway 30 and refresh_before 30 made every request call the IdP."""
    with start_idp(secret=IDP_SECRET, access_ttl=4) as idp:
        with serve(idp, upstream, redis_url, tokens={"leeway": 30, "refresh_before": 30}, mode=mode) as gw:
            tab = Browser(gw, mode, redis_url).start(idp.issue("alice"))
            for _ in range(32):  # 8 s of a page polling every 0.25 s, keeping its cookies as a browser does
                assert tab.get().status_code == 200
                time.sleep(0.25)
            assert 2 <= idp.stats()["refresh_calls"] <= 6  # due at half the 4 s life: every ~2 s, not 32 times
            assert gw.log().count("access tokens live 4 s, less than tokens.refresh_before (30 s)") >= 1


# --- Redis down for seconds while the IdP call is in flight --------------------------------------------------


def test_redis_down_during_the_idp_call_the_successor_is_recorded_when_it_is_back(
    idp: IdPProcess, upstream: ServerProcess, proxy: FaultProxy, redis_url: str
) -> None:
    with serve(idp, upstream, via(proxy, redis_url)) as gw:
        session = expired(idp)
        idp.behaviour(latency=1.0)

        result = store_key(gw, RecordKeys(*[Sealer(STORE_SECRET).token_hash(session["refresh"])] * 2).result)

        async def recorded() -> bool:
            with redis.Redis.from_url(redis_url) as direct:  # not through the proxy
                return bool(direct.exists(result))

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                cookie = {"Cookie": cookie_header(session["access"], session["refresh"])}
                owner = asyncio.ensure_future(client.get(f"{gw.url}/a", headers=cookie))
                await at_the_idp(idp)  # the owner's call is in flight (the IdP answers after 1 s)
                await asyncio.to_thread(proxy.down)
                await asyncio.sleep(2.0)  # Redis is down for 2 s: longer than the IdP call
                await asyncio.to_thread(proxy.heal)
                first = await owner
                await until(recorded, "the owner recorded the successor once Redis was back")
                return first, await client.get(f"{gw.url}/b", headers=cookie)  # another tab, old cookies

        first, other_tab = asyncio.run(scenario())
        assert first.status_code == 200
        assert other_tab.status_code == 200
        assert set_cookies(other_tab)[REFRESH].value == set_cookies(first)[REFRESH].value
        assert_one_redemption_each(idp)
