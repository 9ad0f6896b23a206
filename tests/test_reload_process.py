"""Operations against a real `gateway serve --workers 2`: config reload (file change, SIGHUP) and graceful shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx
import jwt
import yaml
from support.servers import GatewayProcess, ServerProcess, start_gateway

SECRET = "reload-tests-secret-0123456789abcdef"


def token(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 300, **claims}, SECRET, algorithm="HS256")


def config(upstream: str, *, staff_only: bool = False, watch: bool = True) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "app", "path": "/", "upstream": upstream}
    if staff_only:
        route["require"] = {"claims": {"is_staff": True}}
    return {
        "server": {"watch_config": watch},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "cookies": {"secure": False},
        "routes": [route],
    }


def all_workers_up(gateway: GatewayProcess, workers: int = 2) -> None:
    """Workers boot one by one; one that boots after a write would read the new file."""
    assert wait_for(lambda: gateway.log().count("Application startup complete") >= workers)


def write(gateway: GatewayProcess, data: dict[str, Any] | str) -> None:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    tmp = gateway.config_path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, gateway.config_path)  # how editors and config management write files


def statuses(gateway: GatewayProcess, n: int = 12) -> set[int]:
    """Statuses of n requests on fresh connections, so both workers answer."""
    bearer = {"Authorization": f"Bearer {token()}"}
    return {httpx.get(f"{gateway.url}/x", headers=bearer).status_code for _ in range(n)}


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_file_change_reloads_every_worker_and_bad_config_keeps_the_old(upstream: ServerProcess) -> None:
    with start_gateway(config(upstream.url), workers=2) as gw:
        all_workers_up(gw)
        assert statuses(gw) == {200}
        write(gw, config(upstream.url, staff_only=True))
        assert wait_for(lambda: statuses(gw) == {403}), "the new claims rule never applied on every worker"
        write(gw, "tokens: {algorithms: [none]}\nroutes: []\n")
        time.sleep(2.5)
        assert statuses(gw) == {403}  # still the last good config
        assert "tokens.algorithms" in gw.log() and "reload" in gw.log()
        assert wait_for(lambda: 'gateway_config_reloads_total{result="refused"}' in gw.metrics())
        write(gw, config(upstream.url))
        assert wait_for(lambda: statuses(gw) == {200})


def test_sighup_reloads_and_store_changes_are_refused(upstream: ServerProcess) -> None:
    with start_gateway(config(upstream.url, watch=False), workers=2) as gw:
        assert gw.process is not None
        all_workers_up(gw)
        write(gw, config(upstream.url, staff_only=True, watch=False))
        time.sleep(1.5)
        assert statuses(gw) == {200}  # not watching the file: nothing changes without a signal
        os.kill(gw.process.pid, signal.SIGHUP)
        assert wait_for(lambda: statuses(gw) == {403})
        assert gw.process.poll() is None  # reloaded in place, not restarted
        changed = config(upstream.url, watch=False)
        changed["store"] = {"url": "redis://127.0.0.1:1/0", "secret": "x"}
        write(gw, changed)
        os.kill(gw.process.pid, signal.SIGHUP)
        assert wait_for(lambda: "changing the store needs a restart" in gw.log())
        assert statuses(gw) == {403}


def test_sigterm_lets_requests_in_flight_finish(upstream: ServerProcess) -> None:
    with start_gateway(config(upstream.url), workers=1) as gw:
        assert gw.process is not None
        result: dict[str, Any] = {}

        def slow_request() -> None:
            response = httpx.get(f"{gw.url}/_slow/2", headers={"Authorization": f"Bearer {token()}"}, timeout=10)
            result["status"] = response.status_code

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)
        gw.process.send_signal(signal.SIGTERM)
        thread.join(10)
        assert result.get("status") == 200
        # uvicorn re-raises the SIGTERM it caught once shut down, so "ended by SIGTERM" is the clean exit.
        assert gw.process.wait(10) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in gw.log()


def test_metrics_add_up_across_workers(upstream: ServerProcess) -> None:
    with start_gateway(config(upstream.url), workers=2) as gw:
        all_workers_up(gw)
        bearer = {"Authorization": f"Bearer {token()}"}
        for _ in range(20):  # a new connection each: both workers answer some
            assert httpx.get(f"{gw.url}/counted", headers=bearer).status_code == 200
        line = 'gateway_requests_total{method="GET",route="app",status="200"} 20.0'
        # Any worker answers the scrape with both workers' numbers (snapshots are at most 1 s old).
        assert wait_for(lambda: all(line in gw.metrics() for _ in range(4)), timeout=5)
        assert gw.metrics().count("gateway_config_generation{") == 2  # a gauge per worker
