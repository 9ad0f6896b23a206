"""The gateway's own endpoints under ``server.prefix``: health, readiness, metrics, logout, login.

Starlette serves them: they are rare requests, where its conveniences cost nothing that matters.
Logout is ``gateway.logout``; login and its callback, with ``login.oidc``, are ``gateway.login``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Router
from starlette.routing import Route as Endpoint

from gateway.errors import StoreError
from gateway.login import OIDCLogin
from gateway.logout import Logout
from gateway.metrics import Metrics
from gateway.store import Store


def internal_app(prefix: str, store: Store, metrics: Metrics, logout: Logout, oidc: OIDCLogin | None) -> Starlette:
    """The Starlette app for every path under ``prefix``."""

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

    endpoints = [
        Endpoint("/health", health),
        Endpoint("/ready", ready),
        Endpoint("/metrics", render_metrics),
        Endpoint("/logout", logout.handle, methods=["POST"]),
    ]
    if oidc is not None:
        endpoints += [Endpoint("/login", oidc.login), Endpoint("/callback", oidc.callback)]
    app = Starlette(routes=[Mount(prefix, app=Router(endpoints, redirect_slashes=False))])
    # Starlette answers "/health/" with a redirect to a URL built from the Host header: an open
    # redirect on every host that reaches us (issue 14, point 16). A path that is not ours is 404.
    app.router.redirect_slashes = False
    return app
