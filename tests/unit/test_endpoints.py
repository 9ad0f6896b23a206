"""gateway.endpoints with `server.metrics`: the private listener's app, and `{prefix}/metrics` switched off."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.fakes import RecordingUpstream

from gateway.app import Gateway, create_app
from gateway.config import parse_config, reload_problems
from gateway.errors import ConfigError

SECRET = "endpoints-tests-secret-0123456789abcdef"
PRIVATE = 9100


def config(metrics: dict[str, Any] | None, **server: Any) -> dict[str, Any]:
    if metrics is not None:
        server["metrics"] = metrics
    return {
        "server": {"access_log": False, **server},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9", "auth": "none"}],
    }


def app(metrics: dict[str, Any] | None) -> tuple[Gateway, RecordingUpstream]:
    upstream = RecordingUpstream()
    return create_app(parse_config(config(metrics), env={}), forwarder=upstream), upstream


async def get(gateway: Gateway, url: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway)) as client:
        return await client.get(url)


async def test_the_private_port_serves_metrics_and_health_and_never_a_route() -> None:
    gateway, upstream = app({"port": PRIVATE})
    base = f"http://127.0.0.1:{PRIVATE}"
    for path in ("/metrics", "/.gateway/metrics"):
        answer = await get(gateway, base + path)
        assert answer.status_code == 200 and "gateway_requests_total" in answer.text
    for path in ("/health", "/ready", "/.gateway/health"):
        assert (await get(gateway, base + path)).status_code == 200
    for path in ("/x", "/", "/.gateway/.well-known/jwks.json", "/metrics/"):
        assert (await get(gateway, base + path)).status_code == 404
    assert upstream.seen == []  # nothing forwarded from the private port
    assert (await get(gateway, "http://127.0.0.1:8080/x")).status_code == 200  # the public port still routes
    assert (await get(gateway, "http://127.0.0.1:8080/.gateway/metrics")).status_code == 200  # public: true


async def test_public_metrics_off_is_404_while_health_stays() -> None:
    gateway, _ = app({"port": PRIVATE, "public": False})
    assert (await get(gateway, "http://127.0.0.1:8080/.gateway/metrics")).status_code == 404
    assert (await get(gateway, "http://127.0.0.1:8080/.gateway/health")).status_code == 200
    assert (await get(gateway, f"http://127.0.0.1:{PRIVATE}/metrics")).status_code == 200


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({"port": 8080}, "server.metrics.port: 8080 is the public port (server.port)"),
        ({}, "server.metrics.port: Field required"),
        ({"port": 0}, "server.metrics.port:"),
        ({"port": PRIVATE, "extra": 1}, "server.metrics.extra: unknown key"),
    ],
)
def test_bad_listener_settings_are_named(metrics: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(metrics), env={})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_a_new_listener_address_needs_a_restart_but_public_does_not() -> None:
    running = parse_config(config({"port": PRIVATE}), env={})
    assert reload_problems(running, parse_config(config({"port": PRIVATE, "public": False}), env={})) == []
    for other in ({"port": PRIVATE + 1}, None):
        (problem,) = reload_problems(running, parse_config(config(other), env={}))
        assert problem.startswith("server.metrics: ")


def serve(tmp_path: Path, data: dict[str, Any], *args: str) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(path), *args]
    return subprocess.run(command, capture_output=True, timeout=30)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_metrics_port_fails_the_start_with_exit_1_and_a_clear_message(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(tmp_path, config({"port": port}, port=1), "--workers", workers)  # port 1: never bound
    assert done.returncode == 1
    assert f"server.metrics: cannot listen on 127.0.0.1:{port}: Address already in use".encode() in done.stderr
    assert b"Traceback" not in done.stderr


def test_the_metrics_port_may_not_be_the_port_given_on_the_command_line(tmp_path: Path) -> None:
    done = serve(tmp_path, config({"port": 9101}), "--port", "9101")
    assert done.returncode == 1 and b"server.metrics.port: 9101 is the public port" in done.stderr
