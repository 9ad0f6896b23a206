"""The servers floor_bench.py measures, besides proxy_bench's upstream: each starter returns a running
`proxy_bench.Server` pinned to core 0 (the proxy's core), or None with a reason when its program is missing.

- `start_haproxy`: HAProxy 2.5+ verifying the HS256 Bearer token itself (`jwt_verify`), setting X-Auth-User
  from the token's `sub` and proxying to the upstream;
- `start_nginx_proxy`: nginx `proxy_pass` to the upstream, no auth, keep-alive to the upstream;
- `GraceSetup`: Redis, the demo IdP and a gateway that refreshes, primed so that requests carrying a just
  rotated (expired access + old refresh) pair of cookies are served from the grace cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from proxy_bench import HEALTH, PYTHON, Server, free_port, pinned, start
from support.redis_servers import RedisServer, start_redis  # proxy_bench puts tests/ on sys.path
from support.sealed import refresh_cookie
from support.servers import IdPProcess, start_idp

IDP_SECRET = "bench-idp-hs256-secret-0123456789abcdef"
STORE_SECRET = "bench-store-secret"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"


def program(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None)


def pin_to(core: int, pid: int) -> None:
    """Move a running process (all its threads) to one core, when there is more than one."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], capture_output=True, check=False)


def haproxy_version() -> str | None:
    binary = program("haproxy")
    if binary is None:
        return None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"version (\d+\.\d+[\w.+~-]*)", out)
    return found.group(1) if found else "unknown"


def haproxy_config(port: int, upstream: str, audience: str) -> str:
    """HS256 verification with HAProxy's own converters (2.5+): the algorithm from the token's header must be
    HS256, the signature must verify under the secret (read from a file into $BENCH_JWT_SECRET), `exp` must be
    in the future and `aud` the expected one; then X-Auth-User is the token's `sub` (any client-sent one is
    removed first). Anything else: 401."""
    server = upstream.removeprefix("http://")
    return f"""global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s
  option http-keep-alive
frontend gateway
  bind 127.0.0.1:{port}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"${{BENCH_JWT_SECRET}}") -m int 1 }}
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if {{ var(txn.bearer),jwt_payload_query('$.exp','int'),sub(txn.now) -m int lt 1 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {audience} }}
  http-request del-header X-Auth-User
  http-request set-header X-Auth-User %[var(txn.bearer),jwt_payload_query('$.sub')]
  default_backend upstream
backend upstream
  http-reuse always
  server app {server} maxconn 512
"""


def start_haproxy(workdir: Path, upstream: str, secret: str, audience: str) -> Server | None:
    binary = program("haproxy")
    if binary is None:
        return None
    port = free_port()
    conf = workdir / "haproxy.cfg"
    conf.write_text(haproxy_config(port, upstream, audience))
    secret_file = workdir / "jwt-secret"
    secret_file.write_text(secret)
    os.environ["BENCH_JWT_SECRET"] = secret_file.read_text()  # haproxy expands "${...}" from its environment
    subprocess.run([binary, "-c", "-q", "-f", str(conf)], check=True)
    return start("haproxy", pinned(0, [binary, "-db", "-f", str(conf)]), f"http://127.0.0.1:{port}", "/", workdir)


def start_nginx_proxy(workdir: Path, upstream: str) -> Server:
    """nginx `proxy_pass` with the usual keep-alive block. Bodies stay in memory, as the gateway keeps them:
    a 64 KB request body fits client_body_buffer_size, and a 1 MB answer is passed on as it comes
    (proxy_max_temp_file_size 0) rather than spooled to a temporary file."""
    binary = program("nginx")
    if binary is None:
        raise SystemExit("nginx not found: apt-get install nginx-light")
    port, home = free_port(), workdir / "nginx-proxy"
    home.mkdir(exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1; daemon off; pid {home}/nginx.pid; error_log {home}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {home}; proxy_temp_path {home}; fastcgi_temp_path {home};
  uwsgi_temp_path {home}; scgi_temp_path {home};
  client_body_buffer_size 128k; proxy_max_temp_file_size 0;
  upstream app {{ server {upstream.removeprefix("http://")}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $http_host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"""
    )
    return start(
        "nginx-proxy", pinned(0, [binary, "-c", str(conf), "-p", str(home)]), f"http://127.0.0.1:{port}", "/", workdir
    )


def grace_config(upstream: str, idp: str, store_url: str, extra_server: dict[str, Any]) -> dict[str, Any]:
    """A gateway that refreshes (Redis store, the demo IdP's token endpoint), as tests/integration/
    test_refresh_process.py runs it; grace_period long enough for one measurement and its priming."""
    return {
        "server": {"access_log": False, **extra_server},
        "store": {"url": store_url, "key_prefix": f"gwbench:{os.urandom(4).hex()}:", "secret": STORE_SECRET},
        "tokens": {"algorithms": ["HS256"], "secret": IDP_SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": f"{idp}/token",
            "style": "oauth2",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
            "grace_period": 300,
        },
        "cookies": {"secure": True},
        "login": {"url": "https://login.test/?next={next}"},
        "routes": [{"name": "app", "path": "/", "upstream": upstream}],
    }


class GraceSetup:
    """Redis and the demo IdP (core 1) and a refreshing gateway (core 0).

    `prime()` starts a session whose access token has expired and makes one request with it: the gateway
    redeems the refresh token at the IdP (one call) and rotates the cookies. Requests that still carry the
    old pair within `grace_period` are then served the successor from the grace cache (docs/refresh.md, "What
    a request does", 2), without calling the IdP: `idp_calls()` stays where `prime()` left it.
    """

    def __init__(self, workdir: Path, upstream: str, extra_server: dict[str, Any]) -> None:
        self.redis: RedisServer | None = None
        self.idp: IdPProcess | None = None
        self.gateway: Server | None = None
        self.redis = start_redis()
        pin_to(1, self.redis.process.pid)
        self.idp = start_idp(secret=IDP_SECRET)
        assert self.idp.process is not None
        pin_to(1, self.idp.process.pid)
        config = grace_config(upstream, self.idp.url, self.redis.url, extra_server)
        (workdir / "gateway-grace.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        serve = [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--log-level", "warning"]
        command = pinned(0, [*serve, "--config", str(workdir / "gateway-grace.yaml"), "--port", str(port)])
        self.gateway = start("gateway-grace", command, f"http://127.0.0.1:{port}", HEALTH, workdir)

    def idp_calls(self) -> int:
        assert self.idp is not None
        return int(self.idp.stats()["refresh_calls"])

    def redis_commands(self) -> int:
        """Commands Redis has processed so far (INFO stats), this INFO included."""
        import redis

        assert self.redis is not None
        with redis.Redis.from_url(self.redis.url) as client:
            return int(client.info("stats")["total_commands_processed"])

    def prime(self) -> dict[str, str]:
        """One refresh; the old cookies, which from now on hit the grace cache."""
        assert self.idp is not None and self.gateway is not None
        session = self.idp.issue("bench-user", access_ttl=-60)
        old = f"{ACCESS}={session['access']}; {REFRESH}={refresh_cookie(session['refresh'], REFRESH, STORE_SECRET)}"
        before = self.idp_calls()
        first = httpx.get(f"{self.gateway.url}/app", headers={"Cookie": old}, timeout=10)
        if first.status_code != 200 or REFRESH not in first.headers.get("set-cookie", ""):
            raise RuntimeError(f"the priming refresh failed: {first.status_code} {first.text[:200]}")
        again = httpx.get(f"{self.gateway.url}/app", headers={"Cookie": old}, timeout=10)
        if again.status_code != 200 or self.idp_calls() != before + 1:
            raise RuntimeError(f"not a grace hit: {again.status_code}, IdP calls {self.idp_calls() - before}")
        return {"Cookie": old}

    def stop(self) -> None:
        for part in (self.gateway, self.idp, self.redis):
            if part is not None:
                part.stop()
