"""Real nginx and Caddy in front of a gateway in forward-auth mode, run from the snippets in docs/forward-auth.md.

The configs are the documented ones, read from the page at test time, with the documented addresses
(gateway 127.0.0.1:8080, app 127.0.0.1:9000, listening on port 80) replaced by the test's: the docs
cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.ports import launch, stop
from support.servers import wait_for_http

DOCS = Path(__file__).resolve().parents[2] / "docs" / "forward-auth.md"


def snippet(language: str, index: int = 0) -> str:
    """The fenced block of ``language`` number ``index`` (from 0) in docs/forward-auth.md."""
    found = re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), re.DOTALL)
    if len(found) <= index:
        raise AssertionError(f"docs/forward-auth.md has no {language} block number {index}")
    return str(found[index])


def cached_nginx(block: str, cache_dir: Path) -> tuple[str, str]:
    """The nginx block with the page's "answer kept for a second" lines added: (http-level lines, server block)."""
    http_part, location_part = snippet("nginx", 1).split("# In location = /.gateway/auth", 1)
    http_part = http_part.replace("/run/nginx-gateway-auth", str(cache_dir))
    location_part = location_part.split("\n", 1)[1]  # the rest of that comment line
    marker = "location = /.gateway/auth {\n"
    if marker not in block:
        raise AssertionError("the nginx block has no location = /.gateway/auth")
    return http_part, block.replace(marker, marker + location_part, 1)


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {'nginx-light' if name == 'nginx' else name})")
    return path


class FrontProxy:
    """nginx or Caddy on a loopback port of its own, in front of ``gateway`` and ``app`` (host:port each).

    ``nginx-cached`` is nginx with the page's lines that keep the gateway's answers for a second.
    """

    def __init__(self, kind: str, gateway: str, app: str) -> None:
        self.kind, self.gateway, self.app = kind, gateway, app
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-"))
        self.log_path = self.dir / "out.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self, port: int) -> list[str]:
        text = (
            snippet("caddyfile" if self.kind == "caddy" else "nginx")
            .replace("127.0.0.1:8080", self.gateway)
            .replace("127.0.0.1:9000", self.app)
        )
        if self.kind.startswith("nginx"):
            body = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
            http = ""
            if self.kind == "nginx-cached":
                http, body = cached_nginx(body, self.dir / "auth-cache")
            temp = " ".join(
                f"{kind}_temp_path {self.dir};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            conf = (
                f"worker_processes 1; daemon off; pid {self.dir}/nginx.pid; error_log {self.dir}/error.log info;\n"
                f"events {{ worker_connections 1024; }}\nhttp {{ access_log off; {temp}\n{http}\n{body}\n}}\n"
            )
            (self.dir / "nginx.conf").write_text(conf)
            return [binary("nginx"), "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)]
        site = text.replace(":80 {", f":{port} {{\n\tbind 127.0.0.1", 1)  # every Host, as ":80" is
        (self.dir / "Caddyfile").write_text("{\n\tadmin off\n\tauto_https off\n}\n" + site)
        return [binary("caddy"), "run", "--config", str(self.dir / "Caddyfile"), "--adapter", "caddyfile"]

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        command = self._config(port)
        env = {**os.environ, "HOME": str(self.dir), "XDG_DATA_HOME": str(self.dir), "XDG_CONFIG_HOME": str(self.dir)}
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        error_log = self.dir / "error.log"
        return text + (error_log.read_text(errors="replace") if error_log.exists() else "")

    def start(self) -> FrontProxy:
        self.process, self.port = launch(self._spawn, self.log, what=self.kind)
        wait_for_http(self.url + "/.gateway/health", process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> FrontProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if exc[1] is not None:
            print(f"--- {self.kind} log ---\n{self.log()}")
        self.stop()
