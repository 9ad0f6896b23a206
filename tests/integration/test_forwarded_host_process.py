"""Behind a trusted proxy, the host a request is routed on is the host the upstream is told: a real `gateway serve`
(lean forwarder) whose routes differ by host on one echo upstream, as a name-based legacy app behind it would be.

The upstream gets both Host and the trusted proxy's X-Forwarded-Host and may read either (Rails reads
X-Forwarded-Host, Django with USE_X_FORWARDED_HOST). nginx passes a client's X-Forwarded-Host on unless told not to,
so a request routed on ``Host: public.example`` (no login) that said ``X-Forwarded-Host: admin.example`` reached
the admin pages of such an app.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from support.servers import GatewayProcess, start_gateway, start_upstream

SECRET = "forwarded-host-hs256-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with start_upstream() as upstream:
        config = {
            "server": {"access_log": False, "trusted_proxies": ["127.0.0.1"]},
            "tokens": {"algorithms": ["HS256"], "secret": SECRET},
            "routes": [
                {"name": "public", "host": "public.example", "path": "/", "upstream": upstream.url, "auth": "none"},
                {"name": "admin", "host": "admin.example", "path": "/", "upstream": upstream.url},
                {"name": "elsewhere", "path": "/", "upstream": upstream.url, "auth": "none"},
            ],
        }
        with start_gateway(config) as gw:
            yield gw


def _get(gateway: GatewayProcess, **headers: str) -> httpx.Response:
    return httpx.get(f"{gateway.url}/page", headers=headers)


def _reason(response: httpx.Response) -> tuple[int, str | None]:
    return response.status_code, response.json().get("reason") if response.status_code >= 400 else None


@pytest.mark.parametrize(
    "forwarded",
    ["admin.example", "public.example, admin.example", "admin.example, public.example", "", "not a host"],
)
def test_a_trusted_proxys_forwarded_host_naming_another_host_than_the_routed_one_is_400(
    gateway: GatewayProcess, forwarded: str
) -> None:
    assert _reason(_get(gateway, Host="public.example", **{"X-Forwarded-Host": forwarded})) == (400, "bad_host")


def test_two_forwarded_host_headers_must_both_name_the_routed_host(gateway: GatewayProcess) -> None:
    request = b"GET /page HTTP/1.1\r\nHost: public.example\r\nX-Forwarded-Host: public.example\r\n"
    request += b"X-Forwarded-Host: admin.example\r\nConnection: close\r\n\r\n"
    assert _raw(gateway, request).startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("forwarded", ["public.example", "PUBLIC.example:8443", "public.example, public.example."])
def test_a_forwarded_host_naming_the_routed_host_goes_on_as_the_host_the_upstream_is_told(
    gateway: GatewayProcess, forwarded: str
) -> None:
    response = _get(gateway, Host="public.example", **{"X-Forwarded-Host": forwarded})
    assert _reason(response) == (200, None)
    told = [value for name, value in response.json()["headers"] if name in ("host", "x-forwarded-host")]
    assert told == ["public.example", forwarded]


def test_without_a_forwarded_host_the_routed_host_is_the_one_forwarded(gateway: GatewayProcess) -> None:
    response = _get(gateway, Host="public.example")
    assert _reason(response) == (200, None)
    assert [v for n, v in response.json()["headers"] if n == "x-forwarded-host"] == ["public.example"]
    assert _reason(_get(gateway, Host="admin.example")) == (401, "no_token")  # the admin route asks for a login


@pytest.mark.parametrize("forwarded", [b"admin.example:123456", b"admin.example", b""])
def test_a_request_without_host_is_told_no_host_either(gateway: GatewayProcess, forwarded: bytes) -> None:
    # HTTP/1.0 needs no Host: such a request is routed on none (to a route without a host). An X-Forwarded-Host that
    # is no host to the gateway, like a port of six digits, is one to Rails (it drops ":\d+") and Django: admin.example.
    answer = _raw(gateway, b"GET /page HTTP/1.0\r\nX-Forwarded-Host: " + forwarded + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert json.loads(answer.partition(b"\r\n\r\n")[2]).get("reason") == "bad_host"
    assert _raw(gateway, b"GET /page HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")  # routed on no host


def test_a_websocket_handshake_routed_on_one_host_and_told_another_is_400(gateway: GatewayProcess) -> None:
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: public.example\r\nX-Forwarded-Host: admin.example\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = _raw(gateway, handshake)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert json.loads(answer.partition(b"\r\n\r\n")[2] or b"{}").get("reason") == "bad_host"


def _raw(gateway: GatewayProcess, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        return answer
