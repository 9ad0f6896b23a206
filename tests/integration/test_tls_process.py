"""Upstream TLS against real processes: `gateway serve` in front of the echo upstream served by uvicorn over
HTTPS, with a test CA made here (trustme), one of them requiring a client certificate; and a JWKS over HTTPS.

What a user sees: HTTP and WebSocket pass with the route's CA (and `server_name` for a certificate that does not
name the address); a wrong CA, a missing name, a missing client certificate, or no `tls` at all against a private
CA, is 502 `upstream_unreachable`, and the wrong CA leaves one line in the gateway's log that says it was TLS.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa
from support.servers import GatewayProcess, ServerProcess, start_gateway
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

SECRET = "tls-tests-hs256-secret-0123456789abcdef!!"
NOT_CHECKED = "certificate is NOT checked (man-in-the-middle possible)"


class PKI:
    """A test CA and its certificates on disk; another CA that signed none of them."""

    def __init__(self, where: Path) -> None:
        self.ca, other = trustme.CA(), trustme.CA()
        self.dir = where
        self.ca_file = self._write("ca.pem", self.ca.cert_pem)
        self.other_ca_file = self._write("other-ca.pem", other.cert_pem)
        named = self.ca.issue_cert("upstream.test")  # served at 127.0.0.1: only server_name makes it match
        self.named = (
            self._write("named.pem", named.cert_chain_pems[0]),
            self._write("named.key", named.private_key_pem),
        )
        by_ip = self.ca.issue_cert("127.0.0.1")
        self.by_ip = (self._write("ip.pem", by_ip.cert_chain_pems[0]), self._write("ip.key", by_ip.private_key_pem))
        client = self.ca.issue_cert("gateway.test")
        self.client = (
            self._write("client.pem", client.cert_chain_pems[0]),
            self._write("client.key", client.private_key_pem),
        )

    def _write(self, name: str, blob: trustme.Blob) -> str:
        blob.write_to_path(str(self.dir / name))
        return str(self.dir / name)

    def trust(self, with_client_cert: bool = False) -> ssl.SSLContext:
        """The test's own client context (to see the upstreams are up): the CA, no hostname check."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.check_hostname = False
        if with_client_cert:
            context.load_cert_chain(*self.client)
        return context


def start_tls_upstream(cert: tuple[str, str], trust: ssl.SSLContext, client_ca: str | None = None) -> ServerProcess:
    """The echo upstream under uvicorn over HTTPS; with ``client_ca``, a client certificate it signed is required."""

    def args(port: int) -> list[str]:
        command = ["gateway.demo.upstream:create_upstream_app", "--factory", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--ssl-certfile", cert[0], "--ssl-keyfile", cert[1], "--log-level", "warning"]
        if client_ca is not None:
            command += ["--ssl-ca-certs", client_ca, "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED))]
        return command

    server = ServerProcess("uvicorn", args)
    server.scheme, server.verify = "https", trust
    return server.start()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def named_upstream(pki: PKI) -> Iterator[ServerProcess]:
    with start_tls_upstream(pki.named, pki.trust()) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_upstream(pki: PKI) -> Iterator[ServerProcess]:
    with start_tls_upstream(pki.by_ip, pki.trust(with_client_cert=True), client_ca=pki.ca_file) as server:
        yield server


def _route(name: str, upstream: ServerProcess, tls: dict[str, Any] | None) -> dict[str, Any]:
    route: dict[str, Any] = {"name": name, "path": f"/{name}/", "upstream": upstream.url, "auth": "none"}
    return route | ({"tls": tls} if tls is not None else {})


@pytest.fixture(scope="module")
def gateway(pki: PKI, named_upstream: ServerProcess, mtls_upstream: ServerProcess) -> Iterator[GatewayProcess]:
    ca, named = pki.ca_file, named_upstream
    client = {"cert_file": pki.client[0], "key_file": pki.client[1]}
    routes = [
        _route("app", named, {"ca_file": ca, "server_name": "upstream.test"}),
        _route("noname", named, {"ca_file": ca}),
        _route("wrongca", named, {"ca_file": pki.other_ca_file, "server_name": "upstream.test"}),
        _route("default", named, None),
        _route("insecure", named, {"verify": False}),
        _route("mtls", mtls_upstream, {"ca_file": ca, **client}),
        _route("nocert", mtls_upstream, {"ca_file": ca}),
    ]
    config = {
        "store": {"url": "memory://"},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "cookies": {"secure": False},
        "routes": routes,
    }
    with start_gateway(config) as server:
        yield server


def _bad_gateway(response: httpx.Response, route: str) -> bool:
    body = {"error": "bad_gateway", "reason": "upstream_unreachable", "route": route}
    return response.status_code == 502 and response.json() == body


def _log_line(gateway: GatewayProcess, text: str, within: float = 5) -> str:
    deadline = time.monotonic() + within
    while True:
        found = [line for line in gateway.log().splitlines() if text in line]
        if found or time.monotonic() > deadline:
            assert found, f"no log line with {text!r} in:\n{gateway.log()}"
            return found[0]
        time.sleep(0.05)


def test_http_passes_with_the_route_ca_and_server_name(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/app/orders?x=1", content=b"hello", timeout=10)
    assert response.status_code == 200
    assert response.json()["path"] == "/app/orders" and response.json()["body_length"] == 5


def test_websocket_passes_over_tls(gateway: GatewayProcess) -> None:
    for route in ("app", "mtls"):
        with connect(f"{gateway.url.replace('http://', 'ws://')}/{route}/live", open_timeout=10) as socket:
            assert json.loads(socket.recv(timeout=5))["hello"]["path"] == f"/{route}/live"
            socket.send("ping over tls")
            assert socket.recv(timeout=5) == "ping over tls"


def test_a_wrong_ca_is_502_with_a_log_line_that_says_tls(
    gateway: GatewayProcess, named_upstream: ServerProcess
) -> None:
    assert _bad_gateway(httpx.get(f"{gateway.url}/wrongca/x", timeout=10), "wrongca")
    line = _log_line(gateway, "route wrongca: TLS to")
    assert line.endswith(
        f"route wrongca: TLS to {named_upstream.url} failed: certificate verify failed: "
        "unable to get local issuer certificate"
    )
    assert "Traceback" not in gateway.log()


def test_a_wrong_ca_refuses_the_websocket_with_502_and_says_tls(
    gateway: GatewayProcess, named_upstream: ServerProcess
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{gateway.url.replace('http://', 'ws://')}/wrongca/live", open_timeout=10)
    assert refused.value.response.status_code == 502
    line = _log_line(gateway, "route wrongca: upstream WebSocket refused:")
    assert f"TLS to https://{named_upstream.url.split('://')[1]} failed: certificate verify failed" in line


def test_the_certificate_must_match_the_name_and_server_name_sets_it(gateway: GatewayProcess) -> None:
    """The upstream's certificate names upstream.test only: at 127.0.0.1 it fails unless server_name says so."""
    assert _bad_gateway(httpx.get(f"{gateway.url}/noname/x", timeout=10), "noname")
    assert "certificate is not valid for '127.0.0.1'" in _log_line(gateway, "route noname: TLS to")
    assert httpx.get(f"{gateway.url}/app/x", timeout=10).status_code == 200


def test_without_tls_an_https_upstream_is_still_verified(gateway: GatewayProcess) -> None:
    assert _bad_gateway(httpx.get(f"{gateway.url}/default/x", timeout=10), "default")


def test_mutual_tls_passes_with_the_client_certificate_and_fails_without(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/mtls/x", timeout=10).status_code == 200
    assert _bad_gateway(httpx.get(f"{gateway.url}/nocert/x", timeout=10), "nocert")


def test_verify_false_passes_and_is_warned_about_at_start(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/insecure/x", timeout=10).status_code == 200
    line = _log_line(gateway, "tls.verify is false")
    assert "WARNING" in line and "routes[4].tls.verify is false (route insecure)" in line and NOT_CHECKED in line


# --- the control plane: a JWKS over HTTPS with a private CA (tokens.tls) ------------------------------------


class _JWKS(BaseHTTPRequestHandler):
    body = b"{}"
    fetched = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).fetched += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        return


@pytest.fixture(scope="module")
def jwks(pki: PKI) -> Iterator[tuple[str, rsa.RSAPrivateKey]]:
    """An https JWKS on 127.0.0.1 (certificate from the test CA); its URL and the private key it publishes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    _JWKS.body = json.dumps({"keys": [public | {"kid": "tls-test", "use": "sig", "alg": "RS256"}]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JWKS)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*pki.by_ip)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/jwks", key
    server.shutdown()
    server.server_close()


def _jwks_gateway(pki: PKI, jwks_url: str, upstream: ServerProcess, tls: dict[str, Any] | None) -> GatewayProcess:
    tokens: dict[str, Any] = {"algorithms": ["RS256"], "jwks_url": jwks_url}
    if tls is not None:
        tokens["tls"] = tls
    route = _route("app", upstream, {"ca_file": pki.ca_file, "server_name": "upstream.test"})
    return start_gateway(
        {"store": {"url": "memory://"}, "tokens": tokens, "routes": [route | {"path": "/", "auth": "required"}]}
    )


def test_tokens_tls_fetches_a_jwks_signed_by_a_private_ca(
    pki: PKI, jwks: tuple[str, rsa.RSAPrivateKey], named_upstream: ServerProcess
) -> None:
    url, key = jwks
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, key, "RS256", headers={"kid": "tls-test"})
    auth = {"Authorization": f"Bearer {token}"}
    with _jwks_gateway(pki, url, named_upstream, {"ca_file": pki.ca_file}) as trusting:
        response = httpx.get(f"{trusting.url}/x", headers=auth, timeout=10)
        assert response.status_code == 200 and ["x-auth-user", "alice"] in response.json()["headers"]
    with _jwks_gateway(pki, url, named_upstream, None) as default:  # the system's CAs do not know the test CA
        response = httpx.get(f"{default.url}/x", headers=auth, timeout=10)
        assert response.status_code == 503 and response.json()["reason"] == "keys_unavailable"
        assert "certificate verify failed: unable to get local issuer certificate" in _log_line(default, "TLS to")


def test_refresh_tls_refreshes_at_an_idp_behind_a_private_ca(pki: PKI, named_upstream: ServerProcess) -> None:
    from support.sealed import STORE_SECRET, refresh_cookie
    from support.servers import set_cookies, start_idp

    cert, key = pki.by_ip
    with start_idp(algorithm="RS256", ssl_certfile=cert, ssl_keyfile=key, verify=pki.trust()) as idp:

        def config(refresh_tls: dict[str, Any] | None) -> dict[str, Any]:
            refresh: dict[str, Any] = {"endpoint": f"{idp.url}/token", "client_id": "legacy-app"}
            refresh |= {"client_secret": "demo-secret"} | ({"tls": refresh_tls} if refresh_tls else {})
            tokens = {"algorithms": ["RS256"], "jwks_url": f"{idp.url}/jwks", "tls": {"ca_file": pki.ca_file}}
            route = _route("app", named_upstream, {"ca_file": pki.ca_file, "server_name": "upstream.test"})
            return {
                "store": {"url": "memory://", "secret": STORE_SECRET},
                "tokens": tokens,
                "refresh": refresh,
                "cookies": {"secure": False},
                "routes": [route | {"path": "/", "auth": "required"}],
            }

        def expired() -> dict[str, str]:
            session = idp.issue("alice", access_ttl=-60)
            sealed = refresh_cookie(session["refresh"], "gw_refresh")
            return {"Cookie": f"gw_access={session['access']}; gw_refresh={sealed}"}

        with start_gateway(config({"ca_file": pki.ca_file})) as trusting:
            before = idp.stats()["refresh_calls"]
            response = httpx.get(f"{trusting.url}/x", headers=expired(), timeout=10)
            assert response.status_code == 200 and set_cookies(response)["gw_refresh"].value
            assert idp.stats()["refresh_calls"] == before + 1
        with start_gateway(config(None)) as default:  # the IdP's CA unknown to the refresh client: never sent
            before = idp.stats()["refresh_calls"]
            response = httpx.get(f"{default.url}/x", headers=expired(), timeout=10)
            assert response.status_code == 503 and "set-cookie" not in response.headers
            assert idp.stats()["refresh_calls"] == before
            assert "certificate verify failed" in _log_line(default, "TLS to")
