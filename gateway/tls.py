"""TLS to the servers the gateway calls, as one config generation uses it.

Every ``tls`` key of gateway.yaml (``routes[].tls``, ``refresh.tls``, ``tokens.tls``, ``login.oidc.tls``) becomes
one ``ssl.SSLContext``, built once per generation (``config.tls_context``; settings that are equal share it):

    routes[].tls       -> UpstreamTLS, on the compiled route: the forwarder (aiohttp, per request) and the
                          WebSocket client use its context and ``server_name``
    refresh / tokens / -> an httpx client of its own (closed with the generation); without ``tls`` the shared
    login.oidc .tls       control-plane client (tokens.introspection.tls and tokens.userinfo.tls likewise)

A TLS failure is described by ``tls_failure`` in one line that says it was TLS, never a traceback.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.config import GatewayConfig, TLSConfig, ssl_reason, tls_context

log = logging.getLogger("gateway")

CONTROL_PLANE = ("refresh", "tokens", "tokens.introspection", "tokens.userinfo", "login.oidc")


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """What an https connection to one upstream uses: the context, and the name for SNI and the certificate."""

    context: ssl.SSLContext
    server_name: str | None


class _SNITransport(httpx.AsyncHTTPTransport):
    """httpx's transport, sending ``server_name`` as SNI and checking the certificate against it."""

    def __init__(self, server_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._server_name = server_name

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions["sni_hostname"] = self._server_name
        return await super().handle_async_request(request)


def control_client(timeout: float, tls: UpstreamTLS | None = None) -> httpx.AsyncClient:
    """A control-plane client (IdP, JWKS, OIDC): no redirects followed, no idle connections kept.

    No idle connections: a refresh sent on a connection the IdP closed while idle would fail as "sent, answer
    lost" and end the session (docs/refresh.md). The control plane is rare traffic, so a fresh connection each
    time costs little.
    """
    limits = httpx.Limits(max_keepalive_connections=0)
    if tls is None:
        return httpx.AsyncClient(follow_redirects=False, timeout=timeout, limits=limits)
    if tls.server_name is None:
        transport = httpx.AsyncHTTPTransport(verify=tls.context, limits=limits)
    else:
        transport = _SNITransport(tls.server_name, verify=tls.context, limits=limits)
    return httpx.AsyncClient(follow_redirects=False, timeout=timeout, transport=transport)


class TLSSettings:
    """One generation's TLS: a context per distinct setting, the routes' ``UpstreamTLS``, the control-plane clients.

    Built with the generation (reading the PEM files ``gateway check`` checked; a ConfigError when one changed
    since); ``verify: false`` is warned about here, so at start and on every reload.
    """

    def __init__(self, config: GatewayConfig, shared: httpx.AsyncClient) -> None:
        built: dict[TLSConfig, UpstreamTLS] = {}
        names = {f"routes[{i}].tls": route.name for i, route in enumerate(config.routes)}
        by_key: dict[str, UpstreamTLS] = {}
        for key, tls in config.tls_settings():
            if not tls.verify:
                whose = f"(route {names[key]}): the upstream's" if key in names else ": the IdP's"
                log.warning("%s.verify is false %s certificate is NOT checked (man-in-the-middle possible)", key, whose)
            if tls not in built:
                built[tls] = UpstreamTLS(tls_context(key, tls), tls.server_name)
            by_key[key] = built[tls]
        self._routes = {names[key]: value for key, value in by_key.items() if key in names}
        self._shared = shared
        self._clients = {
            section: control_client(config.refresh.timeout, by_key[f"{section}.tls"])
            for section in CONTROL_PLANE
            if f"{section}.tls" in by_key
        }

    def route(self, name: str) -> UpstreamTLS | None:
        """The TLS of route ``name``; None: the defaults (the system's CAs, the URL's host)."""
        return self._routes.get(name)

    def client(self, section: str) -> httpx.AsyncClient:
        """The control-plane client for a section of ``CONTROL_PLANE``: its own with ``tls``, else shared."""
        return self._clients.get(section, self._shared)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def tls_failure(url: object, exc: BaseException) -> str | None:
    """``TLS to https://host:port failed: <why>`` when ``exc`` comes from a TLS handshake (an unknown CA, a
    hostname mismatch, a client certificate refused); None for any other failure."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) and type(current).__module__ == "ssl":
            return f"TLS to {url} failed: {ssl_reason(current)}"
        # aiohttp's errors are ssl.SSLError subclasses too, holding the one that tells in attributes of their own.
        todo += [current.__cause__, current.__context__]
        todo += [getattr(current, name, None) for name in ("certificate_error", "os_error")]
    return None
