"""`server.metrics` through `gateway serve --workers 2`: the private listener answers for every worker, the public
`{prefix}/metrics` is off, and the private port forwards nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support.metrics import metric_value
from support.ports import free_port
from support.servers import GatewayProcess, ServerProcess, start_gateway
from support.waiting import wait_until
from support.workers import WorkerClients, worker_pids

SECRET = "metrics-listener-secret-0123456789abcdef"


class Listener:
    port = 0  # the private port of the attempt that started (a candidate taken meanwhile means another attempt)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def private() -> Listener:
    return Listener()


@pytest.fixture(scope="module")
def gateway(upstream: ServerProcess, private: Listener) -> Iterator[GatewayProcess]:
    def config(port: int) -> dict[str, Any]:
        private.port = free_port()
        while private.port == port:
            private.port = free_port()
        return {
            "server": {"metrics": {"port": private.port, "public": False}},
            "tokens": {"algorithms": ["HS256"], "secret": SECRET},
            "routes": [{"name": "open", "path": "/", "upstream": upstream.url, "auth": "none"}],
        }

    with start_gateway(config, workers=2) as server:
        yield server


def test_the_private_port_counts_the_public_ports_traffic_from_every_worker(
    gateway: GatewayProcess, private: Listener
) -> None:
    with WorkerClients(gateway) as workers:
        served = workers.batch([("GET", f"{gateway.url}/hello", {})] * 8)
    assert {s.worker for s in served} == set(workers.pids) and all(s.response.status_code == 200 for s in served)

    def counted() -> bool:
        with httpx.Client(timeout=10) as client:  # a fresh connection: any worker answers, for all of them
            answer = client.get(f"{private.url}/metrics")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        return metric_value(answer.text, "gateway_requests_total", route="open", method="GET", status="200") >= 8

    wait_until(counted, "the private /metrics counts the 8 requests of both workers")  # snapshots: once a second
    assert httpx.get(f"{private.url}/.gateway/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{private.url}/health", timeout=10).json() == {"status": "ok"}


def test_public_metrics_off_is_404_while_health_works(gateway: GatewayProcess) -> None:
    answer = httpx.get(f"{gateway.url}/.gateway/metrics", timeout=10)
    assert answer.status_code == 404 and "gateway_requests_total" not in answer.text
    assert httpx.get(f"{gateway.url}/.gateway/health", timeout=10).status_code == 200
    assert httpx.get(f"{gateway.url}/.gateway/ready", timeout=10).status_code == 200


def test_the_private_port_forwards_no_route(gateway: GatewayProcess, private: Listener) -> None:
    for path in ("/hello", "/", "/.gateway/logout"):
        answer = httpx.get(f"{private.url}{path}", timeout=10)
        assert answer.status_code == 404 and "headers" not in answer.text  # the echo upstream answers with its headers
    assert httpx.get(f"{gateway.url}/hello", timeout=10).status_code == 200  # the same path on the public port


def test_every_worker_serves_the_private_port(gateway: GatewayProcess, private: Listener) -> None:
    from support.ports import listening_inodes, socket_inodes

    inodes = listening_inodes(private.port)
    assert inodes and all(inodes & socket_inodes(pid) for pid in worker_pids(gateway, 2))
