"""A Sentinel failover during a refresh storm: `gateway serve --workers 4`, redis behind Sentinel, the rotating IdP.

The master is SIGKILLed while the refresh holding the lock waits on the IdP: no request may hang,
none may fail with 500, the IdP sees at most one refresh, and the session carries on afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support.redis_servers import SentinelSetup, start_sentinel_setup
from support.servers import IdPProcess, ServerProcess, start_gateway, start_idp, start_upstream
from support.sessionmodes import MODES, Browser, handed_out, with_mode
from support.waiting import wait_until
from test_refresh_process import IDP_SECRET, gateway_config, refresh_calls

pytestmark = pytest.mark.slow


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    with start_sentinel_setup(tmp_path) as setup:
        yield setup


@pytest.fixture
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture
def upstream() -> Iterator[ServerProcess]:
    with start_upstream() as server:
        yield server


async def _storm(url: str, cookie: str, count: int) -> list[tuple[float, httpx.Response | None]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=25) as client:

        async def one() -> tuple[float, httpx.Response | None]:
            started = time.monotonic()
            try:
                response: httpx.Response | None = await client.get(url, headers={"Cookie": cookie})
            except httpx.TimeoutException:
                response = None
            return time.monotonic() - started, response

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("mode", MODES)
def test_master_killed_during_refresh_storm(
    sentinel_setup: SentinelSetup, idp: IdPProcess, upstream: ServerProcess, mode: str
) -> None:
    config = gateway_config(idp, upstream, "redis://", "gwtest:failover:")
    config["store"] = {
        "sentinel": {"hosts": sentinel_setup.hosts, "master": sentinel_setup.master},
        "key_prefix": "gwtest:failover:",
        "secret": "store-secret-for-tests",
    }
    with start_gateway(with_mode(config, mode), workers=4) as gateway:
        deadline = time.monotonic() + 10
        while httpx.get(f"{gateway.url}/.gateway/ready").status_code != 200:
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.1)
        master = f"redis://127.0.0.1:{sentinel_setup.current_master_port()}/0"
        tab = Browser(gateway, mode, master).start(idp.issue("alice", access_ttl=-60))
        before = refresh_calls(idp)
        idp.behaviour(latency=1.5)  # the lock holder is still at the IdP when the master dies

        def kill_while_at_the_idp() -> None:
            wait_until(lambda: refresh_calls(idp) > before, "the lock holder's refresh reached the IdP", timeout=20)
            sentinel_setup.kill_master()

        with ThreadPoolExecutor(1) as pool:
            killed = pool.submit(kill_while_at_the_idp)
            results = asyncio.run(_storm(f"{gateway.url}/storm", tab.cookie, 100))
            killed.result()
        idp.behaviour(latency=0)

        assert all(response is not None for _, response in results), "a request hung past 25 s"
        assert max(duration for duration, _ in results) < 20
        statuses = sorted({response.status_code for _, response in results if response is not None})
        assert set(statuses) <= {200, 503}, statuses  # never 500, and never a logout
        # The owner was at the IdP when the master died: its answer is not lost with the master.
        assert refresh_calls(idp) - before == 1
        assert max(idp.redemption_counts().values()) == 1
        fresh = [r for _, r in results if r is not None and r.status_code == 200]
        assert fresh, "the IdP rotated the token but no response carried the successor"
        tab.redis_url = f"redis://127.0.0.1:{sentinel_setup.current_master_port()}/0"  # the new master
        assert len(handed_out(fresh, tab)) == 1  # one successor, whoever answered

        tab.keep(fresh[0])  # the browser keeps the cookies the successful response set
        deadline = time.monotonic() + 20
        while True:  # after the failover (a few seconds), the session works again
            follow = httpx.get(f"{gateway.url}/after", headers=tab.headers(), timeout=10)
            if follow.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert follow.status_code == 200, follow.text
        assert refresh_calls(idp) - before <= 1
