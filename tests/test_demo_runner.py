"""`gateway demo`, the README's first command: it starts, and what its banner tells a newcomer to do works."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
from support.servers import free_port, wait_for_http

from gateway.demo.runner import port_in_use


def test_demo_walkthrough() -> None:
    port = free_port()
    while any(port_in_use(p) for p in (port, port + 1, port + 2)):  # the demo needs three ports in a row
        port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    gw = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{gw}/.gateway/health", process=demo)
        assert httpx.get(f"{gw}/hello").status_code == 401
        with httpx.Client(base_url=gw) as client:
            login = client.post("/api/token/", json={"username": "alice", "password": "alice"})
            assert login.status_code == 200 and "refresh" not in login.json()
            assert set(client.cookies) == {"gw_access", "gw_refresh"}
            echo = client.get("/hello", headers={"X-Auth-User": "mallory"}).json()
            assert ["x-auth-user", "alice"] in echo["headers"] and ["x-auth-user", "mallory"] not in echo["headers"]
            assert client.get("/admin/x").status_code == 200
            assert client.post("/.gateway/logout").status_code == 204
            assert client.get("/hello").status_code == 401
        page = httpx.get(f"{gw}/hello", headers={"Accept": "text/html"})
        assert page.status_code == 302 and page.headers["location"].startswith("/.gateway/login")
    finally:
        demo.terminate()
        output = demo.communicate(timeout=10)[0].decode()
    assert "gateway demo is running" in output and f"{gw}/api/token/" in output
    assert demo.returncode == 0


def test_demo_port_in_use_is_a_clear_error() -> None:
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]) as blocker:
        try:
            time.sleep(0.5)
            result = subprocess.run(
                [sys.executable, "-m", "gateway", "demo", "--port", str(port)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            blocker.terminate()
    assert result.returncode == 1
    assert "could not start" in result.stderr and "Traceback" not in result.stderr
