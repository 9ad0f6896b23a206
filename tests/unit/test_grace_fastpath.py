"""A grace hit on admission's fast path (gateway/admission.py ``_remember_grace``), in-process.

The same pair of old cookies again (a page's parallel requests, a client slow to take the rotated
cookies): once the refresher has answered it from its grace memory, admission answers the next ones
itself, with the same successor and cookies, until the grace period ends. Keyed by both cookies as
sent, and ended by the denylist like every fast-path entry.
"""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from support.fakes import RecordingUpstream
from support.sealed import refresh_cookie

from gateway.app import Gateway, create_app
from gateway.config import parse_config
from gateway.demo.idp import IdentityProvider, IdPSettings

SECRET = IdPSettings.hs_secret
STORE_SECRET = "grace-fastpath-store-secret"


@pytest.fixture
def upstream() -> RecordingUpstream:
    return RecordingUpstream()


@pytest.fixture
def gateway(idp_app: Starlette, upstream: RecordingUpstream) -> Gateway:
    config = {
        "server": {"access_log": False},
        "store": {"url": "memory://", "secret": STORE_SECRET},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": "http://idp.test/token",
            "revocation_endpoint": "http://idp.test/revoke",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
            "grace_period": 30,
        },
        "cookies": {"secure": False},
        "login": {"url": "https://login.example/?next={next}"},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
    }
    return create_app(parse_config(config), forwarder=upstream)


def old_cookies(access: str, refresh: str) -> dict[str, str]:
    return {"Cookie": f"gw_access={access}; gw_refresh={refresh_cookie(refresh, 'gw_refresh', STORE_SECRET)}"}


async def get(app: Gateway, headers: dict[str, str], path: str = "/page") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.example") as http:
        return await http.get(path, headers=headers)


def grace_hits(app: Gateway) -> float:
    registry = app.shared.metrics.registry
    return registry.get_sample_value("gateway_refresh_total", {"outcome": "grace_hit"}) or 0.0


async def test_the_same_old_cookies_are_answered_on_the_fast_path_with_the_same_successor(
    gateway: Gateway, idp: IdentityProvider, upstream: RecordingUpstream
) -> None:
    session = idp.start_session("alice", ttl=-60)
    headers = old_cookies(session.access, session.refresh)
    answers = [await get(gateway, headers) for _ in range(3)]  # rotation, grace hit from the store, from memory
    assert idp.counters.refresh_calls == 1 and grace_hits(gateway) == 2
    for _ in range(5):
        answers.append(await get(gateway, headers))
    assert grace_hits(gateway) == 2  # the refresher was not asked again: admission answered
    assert {a.status_code for a in answers} == {200}
    assert len({tuple(a.headers.get_list("set-cookie")) for a in answers}) == 1  # the same successor for all
    assert all(a.headers["cache-control"] == "no-store" for a in answers[2:])
    assert [seen["x-auth-user"] for seen in upstream.seen] == ["alice"] * 8
    assert idp.counters.refresh_calls == 1


async def test_the_old_access_cookie_gets_nothing_with_another_refresh_cookie(
    gateway: Gateway, idp: IdentityProvider, upstream: RecordingUpstream
) -> None:
    alice = idp.start_session("alice", ttl=-60)
    for _ in range(3):
        assert (await get(gateway, old_cookies(alice.access, alice.refresh))).status_code == 200
    forged = await get(gateway, {"Cookie": f"gw_access={alice.access}; gw_refresh=not-a-sealed-cookie"})
    assert forged.status_code == 401 and len(upstream.seen) == 3  # not forwarded, no successor handed out
    bob = idp.start_session("bob", ttl=-60)
    mixed = await get(gateway, old_cookies(alice.access, bob.refresh))  # bob's session, whatever the access cookie
    assert mixed.status_code == 200 and upstream.seen[-1]["x-auth-user"] == "bob"


async def test_a_logout_ends_the_fast_path_answer_at_once(gateway: Gateway, idp: IdentityProvider) -> None:
    session = idp.start_session("alice", ttl=-60)
    headers = old_cookies(session.access, session.refresh)
    answers = [await get(gateway, headers) for _ in range(4)]
    assert {a.status_code for a in answers} == {200}
    rotated = {c.split("=", 1)[0]: c.split(";", 1)[0] for c in answers[0].headers.get_list("set-cookie")}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://app.example") as http:
        logout = await http.post("/.gateway/logout", headers={"Cookie": "; ".join(rotated.values())})
    assert logout.status_code in (204, 302, 303), logout.text
    late = await get(gateway, headers)
    assert late.status_code in (302, 401) and "alice" not in late.text


async def test_the_same_pair_sent_as_chunks_gets_its_chunks_cleared_as_on_the_full_path(
    gateway: Gateway, idp: IdentityProvider
) -> None:
    """Review of dc26aa4: the kept answer's cookies were expanded for a request without chunks; the same values
    sent as a big cookie's chunks must still get those chunks cleared (``CookieJar.expand``), or the browser keeps
    stale chunks beside the new plain cookie."""
    session = idp.start_session("alice", ttl=-60)
    headers = old_cookies(session.access, session.refresh)
    for _ in range(3):  # rotation, grace hit from the store, from memory: the pair is kept
        assert (await get(gateway, headers)).status_code == 200
    refresh = headers["Cookie"].split("; ", 1)[1]
    half = len(session.access) // 2
    chunked = {"Cookie": f"gw_access_0={session.access[:half]}; gw_access_1={session.access[half:]}; {refresh}"}
    answer = await get(gateway, chunked)
    assert answer.status_code == 200
    cleared = {c.split("=", 1)[0] for c in answer.headers.get_list("set-cookie") if "Max-Age=0" in c}
    assert {"gw_access_0", "gw_access_1"} <= cleared
