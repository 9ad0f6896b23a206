"""Operations against a real `gateway serve --workers 2`: config reload (file change, SIGHUP) and graceful shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import yaml
from support.metrics import metric_value, per_worker
from support.servers import GatewayProcess, ServerProcess, start_gateway
from support.waiting import wait_until
from support.workers import WorkerClients

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


def statuses(workers: WorkerClients, n: int = 12) -> dict[int | None, set[int]]:
    """Statuses of n requests, by the worker that answered them; each worker answers some."""
    bearer = {"Authorization": f"Bearer {token()}"}
    return workers.statuses([("GET", f"{workers.gateway.url}/x", bearer)] * n)


def from_every_worker(workers: WorkerClients, status: int) -> dict[int | None, set[int]]:
    """What ``statuses`` is when every worker answered ``status``, and only that."""
    return {pid: {status} for pid in workers.pids}


def every_worker_refused_a_reload(gateway: GatewayProcess, workers: WorkerClients) -> bool:
    """Each worker's own gauge (a pid label each): its last config load was refused."""
    return per_worker(gateway.metrics(), "gateway_config_last_reload_ok") == {pid: 0.0 for pid in workers.pids}


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_file_change_reloads_every_worker_and_bad_config_keeps_the_old(upstream: ServerProcess) -> None:
    with start_gateway(config(upstream.url), workers=2) as gw, WorkerClients(gw) as workers:
        all_workers_up(gw)
        assert statuses(workers) == from_every_worker(workers, 200)
        write(gw, config(upstream.url, staff_only=True))
        assert wait_for(lambda: statuses(workers) == from_every_worker(workers, 403)), (
            "the new claims rule never applied on every worker"
        )
        write(gw, "tokens: {algorithms: [none]}\nroutes: []\n")
        wait_until(lambda: every_worker_refused_a_reload(gw, workers), "every worker read and refused the bad file")
        assert statuses(workers) == from_every_worker(workers, 403)  # still the last good config
        assert "tokens.algorithms" in gw.log() and "reload" in gw.log()
        assert metric_value(gw.metrics(), "gateway_config_reloads_total", result="refused") >= len(workers.pids)
        write(gw, config(upstream.url))
        assert wait_for(lambda: statuses(workers) == from_every_worker(workers, 200))


def test_sighup_reloads_and_store_changes_are_refused(upstream: ServerProcess) -> None:
    with start_gateway(config(upstream.url, watch=False), workers=2) as gw, WorkerClients(gw) as workers:
        assert gw.process is not None
        all_workers_up(gw)
        write(gw, config(upstream.url, staff_only=True, watch=False))
        # A negative check: a watcher (there must be none) looks at the file every second; this gives
        # one the time to act, and cannot fail a gateway that is right.
        time.sleep(1.5)
        assert statuses(workers) == from_every_worker(workers, 200)  # not watching: nothing changes without a signal
        os.kill(gw.process.pid, signal.SIGHUP)
        assert wait_for(lambda: statuses(workers) == from_every_worker(workers, 403))
        assert gw.process.poll() is None  # reloaded in place, not restarted
        changed = config(upstream.url, watch=False)
        changed["store"] = {"url": "redis://127.0.0.1:1/0", "secret": "x"}
        write(gw, changed)
        os.kill(gw.process.pid, signal.SIGHUP)
        wait_until(lambda: every_worker_refused_a_reload(gw, workers), "every worker refused the store change")
        assert "changing the store needs a restart" in gw.log()
        assert statuses(workers) == from_every_worker(workers, 403)


class HeldUpstream:
    """An upstream that answers each request ``hold`` seconds after it arrived, and tells when one has."""

    def __init__(self, hold: float) -> None:
        self.arrived = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.arrived.set()
                time.sleep(hold)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> HeldUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_sigterm_lets_requests_in_flight_finish() -> None:
    with HeldUpstream(hold=2) as held, start_gateway(config(held.url), workers=1) as gw:
        assert gw.process is not None
        result: dict[str, Any] = {}

        def slow_request() -> None:
            response = httpx.get(f"{gw.url}/slow", headers={"Authorization": f"Bearer {token()}"}, timeout=10)
            result["status"] = response.status_code

        thread = threading.Thread(target=slow_request)
        thread.start()
        assert held.arrived.wait(10), "the request never reached the upstream"  # in flight in the gateway now
        gw.process.send_signal(signal.SIGTERM)
        thread.join(10)
        assert result.get("status") == 200
        # uvicorn re-raises the SIGTERM it caught once shut down, so "ended by SIGTERM" is the clean exit.
        assert gw.process.wait(10) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in gw.log()


def test_metrics_add_up_across_workers(upstream: ServerProcess) -> None:
    with start_gateway(config(upstream.url), workers=2) as gw, WorkerClients(gw) as workers:
        all_workers_up(gw)
        bearer = {"Authorization": f"Bearer {token()}"}
        served = workers.batch([("GET", f"{gw.url}/counted", bearer)] * 20)
        assert [s.response.status_code for s in served] == [200] * 20
        assert {s.worker for s in served} == set(workers.pids)  # both workers answered some

        def counted() -> float:
            return metric_value(gw.metrics(), "gateway_requests_total", method="GET", route="app", status="200")

        # Any worker answers the scrape with both workers' numbers (snapshots are at most 1 s old).
        assert wait_for(lambda: all(counted() == 20 for _ in range(4)), timeout=5)
        assert set(per_worker(gw.metrics(), "gateway_config_generation")) == set(workers.pids)  # a gauge per worker
