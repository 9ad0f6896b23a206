"""gateway/tls.py: contexts per tls key, the control-plane clients, and TLS failures told in one line; the
forwarder and the control-plane client against an in-process https server signed by a test CA (trustme)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from gateway.config import TLSConfig, parse_config, tls_context
from gateway.errors import UpstreamFailure
from gateway.forwarder import AiohttpForwarder, upstream_url
from gateway.tls import TLSSettings, UpstreamTLS, control_client, tls_failure
from gateway.upstream_h1 import LeanForwarder

SECRET = "s" * 40


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def https_port(ca: trustme.CA) -> AsyncIterator[int]:
    """An https server on 127.0.0.1 whose certificate names only ``upstream.test``; it answers 200 ``ok``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("upstream.test").configure_cert(context)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client refused our certificate
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1]
    server.close()


def _config(routes: list[dict[str, Any]], **more: Any) -> Any:
    return parse_config({"tokens": {"algorithms": ["HS256"], "secret": SECRET}, "routes": routes, **more}, env={})


def _route(name: str, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {"name": name, "path": f"/{name}/", "upstream": "https://127.0.0.1:9443"}
    return route | ({"tls": tls} if tls is not None else {})


async def test_one_context_per_distinct_setting_and_none_without_tls(ca_file: str) -> None:
    config = _config([_route("a", {"ca_file": ca_file}), _route("b", {"ca_file": ca_file}), _route("c")])
    settings = TLSSettings(config, httpx.AsyncClient())
    a, b = settings.route("a"), settings.route("b")
    assert a is not None and a is b  # built once, shared by equal settings
    assert settings.route("c") is None


async def test_verify_false_is_a_warning_naming_the_route(caplog: pytest.LogCaptureFixture) -> None:
    config = _config([_route("plain"), _route("app", {"verify": False})])
    with caplog.at_level(logging.WARNING, logger="gateway"):
        TLSSettings(config, httpx.AsyncClient())
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "routes[1].tls.verify is false (route app): the upstream's certificate is NOT checked "
        "(man-in-the-middle possible)"
    ]


async def test_control_plane_sections_with_tls_get_their_own_client(ca_file: str) -> None:
    shared = httpx.AsyncClient()
    config = _config(
        [_route("a")],
        tokens={"algorithms": ["RS256"], "jwks_url": "https://idp.test/jwks", "tls": {"ca_file": ca_file}},
        refresh={"endpoint": "https://idp.test/token"},
    )
    settings = TLSSettings(config, shared)
    own = settings.client("tokens")
    assert own is not shared and settings.client("refresh") is shared and settings.client("login.oidc") is shared
    await settings.close()
    assert own.is_closed and not shared.is_closed


async def test_a_retired_generation_keeps_its_own_clients_until_they_linger_out_or_shutdown(ca_file: str) -> None:
    """A request that started before a reload may still refresh, or fetch the JWKS, through the old generation."""
    from gateway.app import create_app
    from gateway.generation import Generation

    config = _config(
        [_route("a")],
        tokens={"algorithms": ["RS256"], "jwks_url": "https://idp.test/jwks", "tls": {"ca_file": ca_file}},
    )
    app = create_app(config)
    old = Generation(config, app.shared)
    own = old.tls.client("tokens")
    await old.close(clients=False)  # what a reload does to the retired generation at once
    assert not own.is_closed
    lingering = asyncio.ensure_future(old.close_clients(after=30))
    await asyncio.sleep(0.05)
    assert not own.is_closed
    lingering.cancel()  # shutdown
    await asyncio.wait([lingering])
    assert own.is_closed


@pytest.mark.parametrize("kind", ["aiohttp", "lean"])
async def test_the_forwarder_verifies_with_the_route_ca_and_server_name(
    https_port: int, ca_file: str, kind: str
) -> None:
    trusted = tls_context("routes[0].tls", TLSConfig(ca_file=ca_file))
    url = upstream_url(f"https://127.0.0.1:{https_port}/")
    forwarder = AiohttpForwarder() if kind == "aiohttp" else LeanForwarder()
    try:
        tls = UpstreamTLS(trusted, "upstream.test")
        response = await forwarder.send("GET", url, [], None, connect_timeout=5, read_timeout=5, tls=tls)
        assert response.status == 200 and await response.read() == b"ok"
        with pytest.raises(UpstreamFailure) as no_name:  # the certificate is not for 127.0.0.1
            await forwarder.send(
                "GET", url, [], None, connect_timeout=5, read_timeout=5, tls=UpstreamTLS(trusted, None)
            )
        with pytest.raises(UpstreamFailure) as default:  # the system's CAs do not know the test CA
            await forwarder.send("GET", url, [], None, connect_timeout=5, read_timeout=5)
    finally:
        await forwarder.close()
    origin = f"https://127.0.0.1:{https_port}"
    assert not no_name.value.timeout
    assert str(no_name.value) == (
        f"TLS to {origin} failed: certificate verify failed: "
        "IP address mismatch, certificate is not valid for '127.0.0.1'."
    )
    assert (
        str(default.value)
        == f"TLS to {origin} failed: certificate verify failed: unable to get local issuer certificate"
    )


async def test_the_control_plane_client_sends_server_name_as_sni(https_port: int, ca_file: str) -> None:
    trusted = tls_context("tokens.tls", TLSConfig(ca_file=ca_file))
    async with control_client(5, UpstreamTLS(trusted, "upstream.test")) as client:
        assert (await client.get(f"https://127.0.0.1:{https_port}/")).text == "ok"
    async with control_client(5, UpstreamTLS(trusted, None)) as client:
        with pytest.raises(httpx.ConnectError, match="IP address mismatch"):
            await client.get(f"https://127.0.0.1:{https_port}/")


def test_tls_failure_is_none_for_failures_that_are_not_tls(tmp_path: Path) -> None:
    assert tls_failure("https://x", ConnectionRefusedError(111, "Connection refused")) is None
    wrapped = OSError("wrapped")
    wrapped.__cause__ = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    assert tls_failure("https://x", wrapped) is not None


async def test_an_introspection_endpoint_with_tls_gets_its_own_client(ca_file: str) -> None:
    shared = httpx.AsyncClient()
    introspection = {"endpoint": "https://idp.test/introspect", "client_id": "gw", "tls": {"ca_file": ca_file}}
    settings = TLSSettings(_config([_route("a")], tokens={"introspection": introspection}), shared)
    own = settings.client("tokens.introspection")
    assert own is not shared and settings.client("tokens") is shared and settings.client("tokens.userinfo") is shared
    await settings.close()
    assert own.is_closed
