"""The worker's memory of a grace hit (gateway.refresh ``_Grace``): never longer than the old token's own grace."""

from __future__ import annotations

from urllib.parse import parse_qs

import httpx
from test_refresh import (
    GRACE,
    SECRET,
    STORE_SECRET,
    Build,
    Clock,
    Introspection,
    assert_cleared,
    assert_refreshed,
    build,
)

from gateway.config import IntrospectionConfig, TokensConfig
from gateway.denylist import Denylist
from gateway.introspection import build_verifier
from gateway.keys import StaticKey
from gateway.sealing import Sealer
from gateway.store import MemoryStore, RecordKeys
from gateway.tokens import Verdict, Verifier

__all__ = ["build"]  # the fixture


async def test_a_grace_hit_followed_to_the_successor_is_not_remembered_for_the_successors_grace(
    build: Build,
) -> None:
    """A held-up request whose token's result is gone (still within grace) follows the successor; if that one
    rotated too, its result says how much of *its* grace is left, not the old token's. Remembered under the old
    token for that long, the old cookie would be answered past its own grace instead of ending the family."""
    clock = Clock()
    store = MemoryStore("gw:", clock=clock)
    h = build(store=store, clock=clock)
    old = h.session()
    _, second = assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    clock.advance(GRACE - 1)
    assert_refreshed(await h.refresher.refresh(second, None), second)  # the successor rotates too
    clock.advance(0.5)
    root = h.hash(old.refresh)
    await store.delete(RecordKeys(root, root).result)  # gone (evicted, or read by a held-up request)
    followed = await h.refresher.refresh(old.refresh, old.access)  # within the old token's grace: carries on
    assert followed.claims is not None
    clock.advance(1)  # the old token's grace is over; the successor's is not
    late = await h.refresher.refresh(old.refresh, old.access)
    assert late.reason == "reuse"
    assert_cleared(late)


class _SlowOnce(Verifier):
    """Verifies as usual; one chosen call takes ``seconds`` (a JWKS fetch, an introspection call, a stalled worker)."""

    def __init__(self, clock: Clock, denylist: Denylist) -> None:
        tokens = TokensConfig(algorithms=("HS256",), secret=SECRET, audience="legacy-app", leeway=0)
        super().__init__(tokens, StaticKey(SECRET.encode()), denied=denylist)
        self.clock, self.slow_token, self.seconds = clock, "", 0.0

    async def verify(self, token: str) -> Verdict:
        verdict = await super().verify(token)
        if token == self.slow_token:
            self.clock.advance(self.seconds)
            self.slow_token = ""
        return verdict


async def test_a_remembered_grace_hit_counts_from_the_stores_read_not_from_after_the_answer(build: Build) -> None:
    """What the store said was left of the grace period is left as of its read: time spent afterwards (verifying
    the successor, a stall) is not added on top, or the old cookie outlives its grace on this worker."""
    clock = Clock()
    verifiers: list[_SlowOnce] = []
    h = build(clock=clock, verifier=lambda denylist: verifiers.append(_SlowOnce(clock, denylist)) or verifiers[-1])
    old = h.session()
    successor, _ = assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    clock.advance(1)
    verifiers[0].slow_token, verifiers[0].seconds = successor, 3  # the grace hit's successor takes 3 s to verify
    assert (await h.refresher.refresh(old.refresh, old.access)).claims is not None  # a grace hit, 4 s left
    clock.advance(1.5)  # 5.5 s after the rotation: the old token's grace is over
    late = await h.refresher.refresh(old.refresh, old.access)
    assert late.reason == "reuse"
    assert_cleared(late)


class _Undated(Introspection):
    """An introspection endpoint whose answers carry no ``exp`` (optional in RFC 7662, never told by userinfo)."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(parse_qs(request.content.decode())["token"][0])
        return httpx.Response(200, json={"active": True, "username": "alice"})

    def verifier(self, denylist: Denylist) -> Verifier:
        config = TokensConfig(
            introspection=IntrospectionConfig(endpoint="https://idp.test/introspect", client_id="gw"),
            required_claims=("exp", "username"),  # exp: never asked of opaque tokens
        )
        client = httpx.AsyncClient(transport=httpx.MockTransport(self))
        hashed = Sealer(STORE_SECRET).token_hash
        return build_verifier(config, StaticKey(None), lambda section: client, token_hash=hashed, denied=denylist)


async def test_an_undated_successor_access_token_is_refused_once_its_family_ends(build: Build) -> None:
    """I3: a rotation's access token joins ``members:{root}`` with or without ``exp`` (as a login's does), so that
    the end of the family denylists it; else it, and the old cookie remembered as a grace hit, go on with 200."""
    h = build(verifier=_Undated().verifier)
    old = h.session()
    access, successor = assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    assert (await h.refresher.refresh(old.refresh, old.access)).claims is not None  # a grace hit, remembered
    await h.refresher.end_session(successor)  # logout with the new cookies
    assert (await h.refresher._verifier.verify(access)).reason == "token_revoked"
    late_tab = await h.refresher.refresh(old.refresh, old.access)
    assert late_tab.reason == "session_ended"
    assert_cleared(late_tab)


async def test_a_remembered_grace_hit_is_not_served_when_verifying_it_outlasted_the_grace(build: Build) -> None:
    """Verifying the successor again may take a while (an opaque token's cached answer lapsed: a call to the
    IdP). The grace period must still last when the answer goes out, or the old cookie outlives it."""
    clock = Clock()
    verifiers: list[_SlowOnce] = []
    h = build(clock=clock, verifier=lambda denylist: verifiers.append(_SlowOnce(clock, denylist)) or verifiers[-1])
    old = h.session()
    successor, _ = assert_refreshed(await h.refresher.refresh(old.refresh, old.access), old.refresh)
    clock.advance(1)
    assert (await h.refresher.refresh(old.refresh, old.access)).claims is not None  # remembered, 4 s left
    clock.advance(2)
    verifiers[0].slow_token, verifiers[0].seconds = successor, 3  # verifying from memory ends past the grace
    late = await h.refresher.refresh(old.refresh, old.access)
    assert late.reason == "reuse"
    assert_cleared(late)
