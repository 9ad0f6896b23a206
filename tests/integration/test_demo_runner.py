"""`gateway demo`, the README's first command: it starts, and what its banner tells a newcomer to do works."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from typing import Any

import httpx
from support.ports import free_port, launch, stop

from gateway.demo.runner import port_in_use


class Demo:
    """``gateway demo --port PORT`` with its output collected as it comes."""

    def __init__(self, port: int) -> None:
        self.process: subprocess.Popen[Any] = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:  # closed once the process is gone (EOF)
            for line in self.process.stdout:
                self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def finish(self) -> str:
        """Stop it (SIGTERM, as Ctrl+C would), and all it wrote."""
        stop(self.process)
        self._reader.join(10)
        return self.output()


def three_free_ports() -> int:
    """A candidate first port for the demo, which takes three in a row; ``launch`` retries if one is taken."""
    port = free_port()
    while any(port_in_use(p) for p in (port, port + 1, port + 2)):
        port = free_port()
    return port


def test_demo_walkthrough() -> None:
    demos: list[Demo] = []

    def start(port: int) -> subprocess.Popen[Any]:
        demos.append(Demo(port))
        return demos[-1].process

    # Up once it listens on all three ports itself; "could not start" (a port taken since) means: elsewhere.
    process, port = launch(
        start,
        lambda: demos[-1].output(),
        what="gateway demo",
        candidates=three_free_ports,
        also=lambda port: (port + 1, port + 2),
        taken=re.compile("could not start"),
    )
    demo = demos[-1]
    gw = f"http://127.0.0.1:{port}"
    try:
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
        output = demo.finish()
    assert "gateway demo is running" in output and f"{gw}/api/token/" in output
    assert process.returncode == 0


def test_demo_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as blocker:  # listening before the demo starts: no wait for another process
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "could not start" in result.stderr and "Traceback" not in result.stderr
