"""``gateway demo``: a rotating demo IdP, an echo upstream and the gateway, in one process.

Nothing to configure and nothing outside loopback: the gateway runs on its embedded defaults
(memory store, HS256 with a demo secret, short-lived access tokens so a refresh is soon seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig, parse_config
from gateway.demo.idp import IdPSettings, create_idp_app
from gateway.demo.upstream import create_upstream_app
from gateway.limits import server_options, websocket_options

DEMO_ACCESS_TTL = 20


def demo_config(port: int, idp_url: str, upstream_url: str, secret: str) -> GatewayConfig:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"url": "memory://", "secret": "demo-store-secret-not-for-production"},
        "tokens": {
            "algorithms": ["HS256"],
            "secret": secret,
            "issuer": idp_url,
            "audience": "legacy-app",
            "leeway": 0,
            "refresh_before": 5,
        },
        "refresh": {
            "endpoint": f"{idp_url}/api/token/refresh/",
            "style": "json",
            "revocation_endpoint": f"{idp_url}/revoke",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "grace_period": 30,
        },
        "cookies": {"secure": False},  # plain http on loopback; keep true (the default) in production
        "login": {
            "oidc": {
                "issuer": idp_url,
                "client_id": "legacy-app",
                "client_secret": "demo-secret",
                "redirect_url": f"http://127.0.0.1:{port}/.gateway/callback",
            }
        },
        "routes": [
            # SimpleJWT-style JSON login: the gateway turns the tokens into httpOnly cookies.
            {"name": "login", "path": "/api/token/", "upstream": idp_url, "auth": "none", "capture": {}},
            {"name": "public", "path": "/public/", "upstream": upstream_url, "auth": "none"},
            {"name": "admin", "path": "/admin/", "upstream": upstream_url, "require": {"claims": {"is_staff": True}}},
            {"name": "app", "path": "/", "upstream": upstream_url},
        ],
    }
    return parse_config(data, env={})


def _banner(port: int, idp_port: int) -> str:
    gw, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    return f"""
gateway demo is running (Ctrl+C to stop)
  gateway            {gw}      routes: /api/token/ (JSON login, captured), /public/, /admin/ (is_staff), /
  demo IdP           http://127.0.0.1:{idp_port}      OpenID provider; users alice/alice (staff), bob/bob
                                               access tokens live {DEMO_ACCESS_TTL}s, refresh tokens rotate
  echo upstream      http://127.0.0.1:{port + 2}      answers with the request it received, headers included

In a browser: open {gw}/ , sign in as alice/alice at the demo IdP, and you are back with the
echo of your request: x-auth-user, x-auth-email, x-auth-roles came from the gateway. Reload after
{DEMO_ACCESS_TTL}s: the gateway refreshed the session by itself. A WebSocket rides the same session;
in the browser console: s = new WebSocket("{ws}/live"); s.onmessage = e => console.log(e.data)
(the upstream's first message lists the identity headers it got). Log out with a POST to
{gw}/.gateway/logout: the socket is closed with code 4401.

With curl:
  # no session: 401 with a reason code (browsers are redirected to the login)
  curl -i {gw}/hello

  # JSON login through the gateway: the tokens become httpOnly cookies, the refresh token
  # never reaches the client's body
  curl -s -c /tmp/gw-jar -X POST {gw}/api/token/ -H 'Content-Type: application/json' \\
       -d '{{"username": "alice", "password": "alice"}}'

  # the upstream sees identity headers; spoofed ones never get through
  curl -s -b /tmp/gw-jar {gw}/hello -H 'X-Auth-User: mallory'

  # after {DEMO_ACCESS_TTL}s the access token has expired: the gateway refreshes it at the IdP and
  # answers with rotated cookies
  sleep {DEMO_ACCESS_TTL}; curl -s -i -b /tmp/gw-jar -c /tmp/gw-jar {gw}/hello | grep -i set-cookie

  # log out: tokens revoked, cookies cleared; the old access token is refused from now on
  curl -s -i -b /tmp/gw-jar -c /tmp/gw-jar -X POST {gw}/.gateway/logout

  # metrics
  curl -s {gw}/.gateway/metrics | grep gateway_
"""


class _Server(uvicorn.Server):
    """Three servers share one loop: signals are handled once, by the demo, not by each server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(port: int) -> None:
    idp_port, upstream_port = port + 1, port + 2
    settings = IdPSettings(issuer=f"http://127.0.0.1:{idp_port}", access_ttl=DEMO_ACCESS_TTL)
    idp_url, upstream_url = f"http://127.0.0.1:{idp_port}", f"http://127.0.0.1:{upstream_port}"
    config = demo_config(port, idp_url, upstream_url, settings.hs_secret)
    gateway = create_app(config)
    servers = [
        _Server(uvicorn.Config(create_idp_app(settings), port=idp_port, log_level="warning")),
        _Server(uvicorn.Config(create_upstream_app(), port=upstream_port, log_level="warning")),
        _Server(
            uvicorn.Config(
                gateway,
                port=port,
                access_log=False,
                proxy_headers=False,
                date_header=False,
                server_header=False,
                **server_options(config.server.limits),
                **websocket_options(config.websocket),
            )
        ),
    ]
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):
            for server in servers:
                server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            raise SystemExit(f"gateway demo: could not start (is port {port}, {idp_port} or {upstream_port} in use?)")
        await asyncio.sleep(0.05)
    print(_banner(port, idp_port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def run_demo(port: int = 8080) -> int:
    busy = [p for p in (port, port + 1, port + 2) if port_in_use(p)]
    if busy:
        print(
            f"gateway demo: could not start: port {', '.join(map(str, busy))} is in use "
            f"(the demo needs {port}, {port + 1} and {port + 2}; try --port N)",
            file=sys.stderr,
        )
        return 1
    try:
        asyncio.run(_serve(port))
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0
