"""gateway/tunnel.py in-process: which close codes may be sent, and what the watchdog ends."""

from __future__ import annotations

import time

import pytest

from gateway.config import WebSocketConfig
from gateway.denylist import Denylist
from gateway.families import ENDED, SESSION
from gateway.metrics import Metrics
from gateway.store import MemoryStore
from gateway.tunnel import SESSION_ENDED, Sockets, Tunnel, sendable


@pytest.mark.parametrize(
    ("code", "sent"),
    [(1000, 1000), (1001, 1001), (1011, 1011), (1014, 1014), (4000, 4000), (4999, 4999), (3000, 3000)],
)
def test_sendable_codes_pass_through(code: int, sent: int) -> None:
    assert sendable(code, fallback=1000) == sent


@pytest.mark.parametrize("code", [None, 1004, 1005, 1006, 1015, 1016, 2999, 999, 5000])
def test_codes_that_cannot_be_sent_become_the_fallback(code: int | None) -> None:
    assert sendable(code, fallback=1001) == 1001


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_watchdog_ends_sessions_expired_tokens_and_idle_sockets() -> None:
    clock = Clock()
    denylist = Denylist(MemoryStore("t:", clock=clock), clock=clock)
    sockets = Sockets(denylist, Metrics(), clock)
    sockets.config = WebSocketConfig(idle_timeout=60)
    session = Tunnel((ENDED + "jti-1", SESSION + "family-1"), None)
    expiring = Tunnel((), clock.now + 30)
    idle = Tunnel((), None)
    quiet = Tunnel((ENDED + "jti-2",), None)
    for tunnel in (session, expiring, idle, quiet):
        slot = sockets.reserve(limit=10)
        assert slot is not None
        sockets.add(tunnel, slot)
    assert sockets.reserve(limit=4) is None  # full
    sockets.release(sockets.reserve(limit=5) or pytest.fail("a fifth slot"))
    sockets.sweep()
    assert not any(t.stop.done() for t in (session, expiring, idle, quiet))

    await denylist.deny(SESSION + "family-1", clock.now + 600)
    await denylist.deny("jti-2", clock.now + 600)  # superseded (HTTP refuses it): not a socket's end
    clock.now += 31
    idle.last_active -= 61
    sockets.sweep()
    assert session.stop.result() == (SESSION_ENDED, "session ended", "session_ended")
    assert expiring.stop.result() == (SESSION_ENDED, "token expired", "token_expired")
    assert idle.stop.result() == (1001, "idle timeout", "idle")
    assert not quiet.stop.done()

    for tunnel in (session, expiring, idle, quiet):
        sockets.discard(tunnel, "test")
    assert len(sockets) == 0
    assert sockets.reserve(limit=1) is not None  # every slot was given back
    await sockets.close()
