"""The gateway's own endpoints under ``server.prefix``: health, readiness, metrics, logout, login, back-channel
logout (``gateway.backchannel``), and with
``identity.assertion`` the key that verifies its assertions (``.well-known/jwks.json``). With ``server.metrics``,
``private_app`` answers on the private listener.

Starlette serves them: they are rare requests, where its conveniences cost nothing that matters.
Logout is ``gateway.logout``; login and its callback, with ``login.oidc``, are ``gateway.login``.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Router
from starlette.routing import Route as Endpoint

from gateway.backchannel import BackchannelLogout
from gateway.errors import StoreError
from gateway.login import OIDCLogin
from gateway.logout import Logout
from gateway.metrics import Metrics
from gateway.store import Store


def observability(store: Store, metrics: Metrics, *, with_metrics: bool = True) -> list[Endpoint]:
    """``/health``, ``/ready`` and (``with_metrics``) ``/metrics``: on the public port and the private listener."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        try:
            await store.ping()
        except StoreError:
            metrics.store_error("ready")
            return JSONResponse({"status": "unavailable", "store": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def render_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    found = [Endpoint("/health", health), Endpoint("/ready", ready)]
    return [*found, Endpoint("/metrics", render_metrics)] if with_metrics else found


def internal_app(
    prefix: str,
    store: Store,
    metrics: Metrics,
    logout: Logout,
    oidc: OIDCLogin | None,
    *,
    jwks: dict[str, Any] | None = None,
    public_metrics: bool = True,
    backchannel: BackchannelLogout | None = None,
) -> Starlette:
    """The Starlette app for every path under ``prefix``; ``jwks``: the assertion's public key set;
    ``public_metrics`` False: no ``metrics`` here (``server.metrics.public``)."""
    endpoints = observability(store, metrics, with_metrics=public_metrics)
    endpoints.append(Endpoint("/logout", logout.handle, methods=["POST"]))
    if oidc is not None:
        endpoints += [Endpoint("/login", oidc.login), Endpoint("/callback", oidc.callback)]
    if backchannel is not None:
        endpoints.append(Endpoint("/backchannel-logout", backchannel.handle, methods=["POST"]))
    if jwks is not None:

        async def key_set(request: Request) -> Response:
            return JSONResponse(jwks, headers={"cache-control": "public, max-age=300"})

        endpoints.append(Endpoint("/.well-known/jwks.json", key_set))
    app = Starlette(routes=[Mount(prefix, app=Router(endpoints, redirect_slashes=False))])
    # Starlette answers "/health/" with a redirect to a URL built from the Host header: an open
    # redirect on every host that reaches us (issue 14, point 16). A path that is not ours is 404.
    app.router.redirect_slashes = False
    return app


def private_app(prefix: str, store: Store, metrics: Metrics) -> Starlette:
    """The private metrics listener's app (``server.metrics``): health, ready and metrics at the root and under
    ``prefix``; anything else, WebSockets included, is refused. Never a route."""
    endpoints = observability(store, metrics)
    app = Starlette(routes=[*endpoints, Mount(prefix, app=Router(endpoints, redirect_slashes=False))])
    app.router.redirect_slashes = False
    return app
