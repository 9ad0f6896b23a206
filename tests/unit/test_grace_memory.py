"""The worker's memory of a grace hit (gateway.refresh ``_Grace``): never longer than the old token's own grace."""

from __future__ import annotations

from test_refresh import GRACE, Build, Clock, assert_cleared, assert_refreshed, build

from gateway.store import MemoryStore, RecordKeys

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
