"""Real servers on loopback for integration tests: the demo IdP, the echo upstream and `gateway serve`
as subprocesses, each on a port of its own (see support.ports: never a port freed for it by the test)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from support.ports import free_port as free_port  # re-exported: bench/ picks candidate ports here
from support.ports import launch, stop


def wait_for_http(
    url: str, timeout: float = 15, process: subprocess.Popen[bytes] | None = None, verify: ssl.SSLContext | bool = True
) -> None:
    """Poll ``url`` until it answers with any HTTP status; give up early if ``process`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1, verify=verify)
            return
        except httpx.TransportError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before {url} answered") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.05)


class ServerProcess:
    """``python -m module args(port)...`` as a subprocess; stopped on exit.

    Started on a candidate port, it counts as up once it listens there itself and ``ready_path``
    answers; when the port was taken in between it exits ("address already in use") and is started
    again on another (``support.ports.launch``). So the arguments are a function of the port, and
    ``port``/``url`` are known once started. ``port=`` pins the port (no retry). An https server sets ``scheme``
    and ``verify`` (the SSLContext that trusts it, with a client certificate when it asks for one).
    """

    scheme = "http"
    verify: ssl.SSLContext | bool = True

    def __init__(
        self, module: str, args: Callable[[int], list[str]], ready_path: str = "/", port: int | None = None
    ) -> None:
        self.module, self.args, self.ready_path = module, args, ready_path
        self.port = port or 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] | None = None
        self._pinned = port
        self._log = tempfile.NamedTemporaryFile(prefix=f"{module}-", suffix=".log", delete=False)

    def prepare(self, port: int) -> None:
        """Called before each start attempt, with the port it is for (GatewayProcess writes its config)."""

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        self._log.seek(0)
        self._log.truncate()  # the log of this attempt only
        self.prepare(port)
        command = [sys.executable, "-m", self.module, *self.args(port)]
        return subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

    def start(self) -> Self:
        if self.process is None:
            try:
                self.process, self.port = launch(self._spawn, self.log, what=self.module, port=self._pinned)
                self.url = f"{self.scheme}://127.0.0.1:{self.port}"
                wait_for_http(self.url + self.ready_path, process=self.process, verify=self.verify)
            except Exception as exc:
                log = self.log()
                self.stop()
                raise RuntimeError(f"{self.module} did not start:\n{log}") from exc
        return self

    def stop(self) -> None:
        """Terminate, kill after 5 s, delete the log; safe to call twice."""
        if self.process is not None:
            stop(self.process)
        if not self._log.closed:
            self._log.close()
            os.unlink(self._log.name)

    def log(self) -> str:
        """What the process has written to stdout and stderr so far."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:  # pytest shows captured stderr of a failed test
            sys.stderr.write(f"--- {self.module} log ---\n{self.log()}\n")
        self.stop()


class IdPProcess(ServerProcess):
    """The demo IdP; control helpers call its ``/_admin`` endpoints."""

    public_key_path: str | None = None
    _owns_public_key = False

    def stop(self) -> None:
        super().stop()
        if self._owns_public_key and self.public_key_path and os.path.exists(self.public_key_path):
            os.unlink(self.public_key_path)

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(method, f"{self.url}/_admin/{path}", json=body, timeout=5, verify=self.verify)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, int]:
        return dict(self._admin("GET", "stats"))

    def behaviour(self, **kw: Any) -> dict[str, Any]:
        """E.g. ``behaviour(fail="503", fail_count=1)``, ``behaviour(latency=0.5)``, ``behaviour(reuse_window=5)``,
        ``behaviour(revoke_used=False, reuse_revokes_family=False)``, ``behaviour(jwks="down", clock_skew=30)``;
        without arguments, the current behaviour. Unknown or ill-typed fields are refused (HTTP 400)."""
        return dict(self._admin("POST", "behaviour", kw))

    def reset(self) -> None:
        """Zero the counters, clear the ledger, return to the start-up behaviour (keys and sessions stay)."""
        self._admin("POST", "reset")

    def ledger(self) -> list[dict[str, Any]]:
        """Every refresh request since the last reset, oldest first: ``{"jti", "family", "event", "at"}``.

        ``event`` is ``redeemed``, ``reused``, ``reused_in_window``, ``rejected`` or ``failed`` (an injected
        failure answered before redeeming); ``jti`` and ``family`` are None for a token the IdP did not sign.
        """
        return list(self._admin("GET", "ledger")["entries"])

    def redemption_counts(self) -> dict[str, int]:
        """How many times each refresh token (jti) was presented and recognised: redeemed, reused or reused
        in the reuse window. A client that never presents a token twice keeps every count at 1."""
        counts: dict[str, int] = {}
        for entry in self.ledger():
            if entry["jti"] is not None and entry["event"] in ("redeemed", "reused", "reused_in_window"):
                counts[entry["jti"]] = counts.get(entry["jti"], 0) + 1
        return counts

    def families(self) -> list[dict[str, Any]]:
        """Every session: ``{"id", "username", "current", "previous", "revoked", "revoked_reason", "issued"}``."""
        return list(self._admin("GET", "families")["families"])

    def rotate_key(self, drop_old: bool = False) -> str:
        """RS256: sign with a new key from now on; the JWKS keeps the previous key unless ``drop_old``. The kid."""
        return str(self._admin("POST", "rotate_key", {"drop_old": drop_old})["kid"])

    def issue(
        self, username: str, access_ttl: int | None = None, claims: dict[str, Any] | None = None
    ) -> dict[str, str]:
        """A fresh session without a login or refresh call: ``{"access", "refresh"}``."""
        return dict(self._admin("POST", "issue", {"username": username, "access_ttl": access_ttl, "claims": claims}))

    def sign_in(self, authorize_url: str, username: str = "alice", password: str | None = None) -> str:
        """Do what a browser does at the OIDC login page; return where the IdP redirects (the callback URL)."""
        import re
        from html import unescape

        page = httpx.get(authorize_url, timeout=5)
        page.raise_for_status()
        hidden = re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', page.text)
        form = {unescape(k): unescape(v) for k, v in hidden} | {"username": username, "password": password or username}
        response = httpx.post(f"{self.url}/authorize", data=form, timeout=5)
        if response.status_code != 302:
            raise AssertionError(f"sign-in failed: {response.status_code} {response.text[:200]}")
        return response.headers["location"]


def start_idp(**opts: Any) -> IdPProcess:
    """Start ``gateway.demo.idp``; options are its flags (``algorithm="RS256"``, ``access_ttl=5``, ``latency=0.2``,
    ``reuse_window=5``, ``clock_skew=30``); ``True`` passes a bare switch (``ignore_revoke_used=True``,
    ``reuse_keeps_family=True``), ``False`` leaves it out.

    With RS256 the public key is written to a temporary file, ``.public_key_path``. Unless ``issuer=`` is
    given, the issuer is the IdP's own URL (``.url``), which OIDC discovery needs; ``redirect_uri=`` takes
    a URI or a list (none: any loopback URI is accepted). ``ssl_certfile=``/``ssl_keyfile=`` serve HTTPS;
    ``verify=`` is then the SSLContext that trusts it (for readiness and the admin calls).
    """
    verify = opts.pop("verify", True)
    owns_public_key = opts.get("algorithm") == "RS256" and "public_key_out" not in opts
    if owns_public_key:
        fd, opts["public_key_out"] = tempfile.mkstemp(prefix="idp-", suffix=".pem")
        os.close(fd)
    flags: list[str] = []
    for key, value in opts.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags += [flag] if value else []
            continue
        for item in value if isinstance(value, list) else [value]:
            flags += [flag, "" if item is None else str(item)]

    def args(port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port), *flags]

    # Ready when the admin API answers (polling /jwks would count in jwks_requests).
    idp = IdPProcess("gateway.demo.idp", args, ready_path="/_admin/stats")
    if opts.get("ssl_certfile"):
        idp.scheme, idp.verify = "https", verify
    idp.public_key_path, idp._owns_public_key = opts.get("public_key_out"), owns_public_key
    return idp.start()


def start_upstream() -> ServerProcess:
    """Start the echo upstream ``gateway.demo.upstream``."""
    return ServerProcess("gateway.demo.upstream", lambda port: ["--host", "127.0.0.1", "--port", str(port)]).start()


class GatewayProcess(ServerProcess):
    """``gateway serve`` as a real process (several uvicorn workers when asked)."""

    config_path: str = ""
    config: dict[str, Any] | Callable[[int], dict[str, Any]] = {}
    workers: int = 1

    def prepare(self, port: int) -> None:
        """Write the config for this port (a config may name the gateway's own URL)."""
        import yaml

        data = self.config(port) if callable(self.config) else self.config
        with open(self.config_path, "w") as handle:
            yaml.safe_dump(data, handle)

    def start(self) -> Self:
        """Started once every worker is past its startup (its first store, denylist and JWKS reads): a test that
        then takes the store or the IdP away races none of them (a worker that starts with the store away knows no
        revocation, and refuses tokens until it does)."""
        super().start()
        deadline = time.monotonic() + 30
        while self.log().count("Application startup complete.") < self.workers:
            if time.monotonic() > deadline or (self.process is not None and self.process.poll() is not None):
                log = self.log()
                self.stop()
                raise RuntimeError(f"gateway: not every worker started:\n{log}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        super().stop()
        if self.config_path and os.path.exists(self.config_path):
            os.unlink(self.config_path)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/.gateway/metrics", timeout=5).text


def start_gateway(
    config: dict[str, Any] | Callable[[int], dict[str, Any]],
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> GatewayProcess:
    """Write ``config`` as YAML and run ``python -m gateway serve`` on a port of its own (``port=`` pins it).

    ``config`` may be a function of the port, for a config that names the gateway's own URL (an OIDC
    redirect_url): it is written again for each port tried.
    """
    fd, path = tempfile.mkstemp(prefix="gateway-", suffix=".yaml")
    os.close(fd)

    def args(port: int) -> list[str]:
        return ["serve", "--config", path, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]

    gateway = GatewayProcess("gateway", args, ready_path="/.gateway/health", port=port)
    gateway.config_path, gateway.config, gateway.workers = path, config, workers
    if env:
        gateway.env = {**os.environ, **env}
    return gateway.start()


def set_cookies(response: httpx.Response) -> dict[str, Any]:
    """The cookies a response sets, by name (``http.cookies.Morsel``: ``.value``, ``["max-age"]``...)."""
    from http.cookies import SimpleCookie

    jar: dict[str, Any] = {}
    for line in response.headers.get_list("set-cookie"):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(line)
        jar.update(cookie)
    return jar
