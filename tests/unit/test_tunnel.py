"""gateway/tunnel.py in-process: what the watchdog ends, and the message counts it turns into metrics."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest
from support.fakes import RecordingUpstream

from gateway.app import create_app
from gateway.config import WebSocketConfig, parse_config
from gateway.denylist import Denylist
from gateway.families import ENDED, SESSION
from gateway.metrics import Metrics
from gateway.store import MemoryStore
from gateway.tunnel import SESSION_ENDED, Sockets, Tunnel


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


async def test_the_messages_each_socket_counted_reach_the_metrics_at_each_sweep_and_at_close() -> None:
    clock = Clock()
    metrics = Metrics()
    sockets = Sockets(Denylist(MemoryStore("t:", clock=clock), clock=clock), metrics, clock)

    def relayed(direction: str) -> float | None:
        return metrics.registry.get_sample_value("gateway_websocket_messages_total", {"direction": direction})

    tunnel = Tunnel((), None)
    sockets.add(tunnel, sockets.reserve(limit=1) or pytest.fail("a slot"))
    tunnel.to_upstream, tunnel.to_client = 3, 2
    sockets.sweep()
    assert (relayed("to_upstream"), relayed("to_client")) == (3, 2)
    assert (tunnel.to_upstream, tunnel.to_client) == (0, 0)  # counted once
    tunnel.to_client = 4
    sockets.discard(tunnel, "client")
    assert (relayed("to_upstream"), relayed("to_client")) == (3, 6)
    await sockets.close()


async def test_a_logout_with_a_token_that_expired_since_still_closes_the_sockets_opened_with_it() -> None:
    """Regression (I3): ``ended:{jti}`` was dated by the token's exp, so a logout after it (a socket outlives its
    token by default) wrote an entry that had lapsed already: the socket opened with that token (one of no session
    of the gateway's: a Bearer token from elsewhere, a login without a refresh token) stayed open."""
    clock = Clock()
    secret = "tunnel-tests-secret-0123456789abcdef"
    config = {
        "server": {"access_log": False},
        "tokens": {"algorithms": ["HS256"], "secret": secret},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
    }
    app = create_app(parse_config(config), forwarder=RecordingUpstream(), clock=clock)
    sockets = app.shared.sockets
    opened = Tunnel((ENDED + "jti-1",), None)  # opened with the token (gateway.families.watch_keys: no session)
    sockets.add(opened, sockets.reserve(limit=10) or pytest.fail("a slot"))
    # The socket lived on; the token it was opened with expired an hour ago.
    token = jwt.encode({"sub": "alice", "exp": int(clock.now - 3600), "jti": "jti-1"}, secret, algorithm="HS256")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        logout = await client.post("/.gateway/logout", headers={"Authorization": f"Bearer {token}"})
    assert logout.status_code == 204
    sockets.sweep()
    assert opened.stop.done() and opened.stop.result()[0] == SESSION_ENDED
    await sockets.close()
