"""Token capture fails closed, against real processes: `gateway serve`, the demo IdP, a login upstream (issue 14,
item 17).

A 2xx login answer the gateway cannot read (compressed, not JSON) is refused with 502 and its body never reaches
the client; a refused login passes through unchanged; capture routes ask the upstream for an unencoded answer.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from support.sealed import STORE_SECRET, refresh_token_in
from support.servers import GatewayProcess, IdPProcess, ServerProcess, set_cookies, start_gateway, start_idp

IDP_SECRET = "capture-tests-hs256-secret-0123456789abcdef"
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"


class LoginUpstream:
    """A login endpoint in this process that answers the tokens it is given in the ways apps do (and should not)."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.accept_encodings: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.accept_encodings.append(self.headers.get("accept-encoding"))
                status, headers, body = outer.answer(self.path.rsplit("/", 2)[-2])
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, kind: str) -> tuple[int, list[tuple[str, str]], bytes]:
        tokens = json.dumps(self.tokens).encode()
        as_json = [("content-type", "application/json")]
        if kind == "gzip":  # an app (or a middleware) that compresses whatever the client accepts, or not
            return 200, [*as_json, ("content-encoding", "gzip")], gzip.compress(tokens)
        if kind == "html":
            page = f"<html><script>var t = {tokens.decode()};</script></html>".encode()
            return 200, [("content-type", "text/html; charset=utf-8")], page
        if kind == "mislabelled":
            form = f"access={self.tokens['access']}&refresh={self.tokens['refresh']}".encode()
            return 200, as_json, form
        if kind == "refused":
            return 401, as_json, b'{"detail": "No active account found with the given credentials"}'
        return 200, as_json, tokens

    def __enter__(self) -> LoginUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=IDP_SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def login() -> Iterator[LoginUpstream]:
    with LoginUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, login: LoginUpstream, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    config = {
        "server": {"access_log": False},
        "store": {"url": redis_url, "key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": STORE_SECRET},
        "tokens": {"algorithms": ["HS256"], "secret": IDP_SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {"endpoint": f"{idp.url}/token", "client_id": "legacy-app", "client_secret": "demo-secret"},
        "routes": [
            {"name": "login", "path": "/login/", "upstream": login.url, "auth": "none", "capture": {}},
            {"name": "app", "path": "/", "upstream": upstream.url},
        ],
    }
    with start_gateway(config, workers=2) as server:
        yield server


def post(gateway: GatewayProcess, kind: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/login/{kind}/", json={"username": "alice"}, headers=headers, timeout=30)


@pytest.mark.parametrize("kind", ["gzip", "html", "mislabelled"])
def test_a_2xx_login_answer_the_gateway_cannot_read_is_refused_and_never_passed_on(
    gateway: GatewayProcess, idp: IdPProcess, login: LoginUpstream, kind: str
) -> None:
    """Regression (issue 14, item 17): a compressed or non-JSON login answer reached the page, refresh token and all."""
    login.tokens = idp.issue("alice")
    response = post(gateway, kind, **{"Accept-Encoding": "gzip, br"})
    assert response.status_code == 502 and response.json()["reason"] == "capture_failed"
    assert login.tokens["refresh"] not in response.text and login.tokens["access"] not in response.text
    assert "content-encoding" not in response.headers and "set-cookie" not in response.headers


def test_a_refused_login_passes_through_unchanged(gateway: GatewayProcess, login: LoginUpstream) -> None:
    response = post(gateway, "refused")
    assert response.status_code == 401 and response.json()["detail"].startswith("No active account")
    assert "set-cookie" not in response.headers


def test_capture_routes_ask_for_an_unencoded_answer_and_a_json_one_is_captured(
    gateway: GatewayProcess, idp: IdPProcess, login: LoginUpstream
) -> None:
    login.tokens = idp.issue("alice")
    login.accept_encodings.clear()
    response = post(gateway, "json", **{"Accept-Encoding": "gzip, deflate, br"})
    assert response.status_code == 200 and response.json() == {"access": login.tokens["access"]}
    assert refresh_token_in(set_cookies(response)[REFRESH].value, REFRESH) == login.tokens["refresh"]
    # A request without Accept-Encoding accepts any coding (RFC 9110 §12.5.3): the gateway says identity.
    post(gateway, "json")
    assert login.accept_encodings == ["identity", "identity"]
