"""Answers the gateway makes itself, written straight to ASGI ``send``.

One table maps each denial reason to a status. Browsers navigating without a session are
redirected to login; everything else gets small JSON naming a reason code. Internals (upstream
addresses, exception text, tokens) never appear in a body.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from html import escape
from typing import Any
from urllib.parse import quote, unquote

from gateway.cache import BoundedCache
from gateway.reasons import Reason
from gateway.types import RawHeaders, Scope, Send

log = logging.getLogger("gateway")

# reason -> (status, error) ; unknown reasons are 401 invalid_token.
STATUS: dict[Reason, tuple[int, str]] = {
    Reason.CLAIMS_DENIED: (403, "forbidden"),
    Reason.CLAIM_UNSAFE: (403, "forbidden"),
    Reason.CSRF: (403, "forbidden"),
    Reason.UNTRUSTED_PROXY: (403, "forbidden"),
    Reason.PROXY_MODE_ONLY: (403, "forbidden"),
    Reason.CORS_ORIGIN: (403, "forbidden"),
    Reason.BAD_PATH: (400, "bad_request"),
    Reason.BAD_HOST: (400, "bad_request"),
    Reason.BAD_HEADER: (400, "bad_request"),
    Reason.INVALID_REQUEST: (400, "invalid_request"),
    Reason.METHOD_NOT_ALLOWED: (405, "method_not_allowed"),
    Reason.BODY_TOO_LARGE: (413, "content_too_large"),
    Reason.UNSUPPORTED_CODING: (501, "not_implemented"),
    Reason.HEADERS_TOO_LARGE: (431, "request_header_fields_too_large"),
    Reason.TOO_MANY_HEADERS: (431, "request_header_fields_too_large"),
    Reason.HEADER_TIMEOUT: (408, "request_timeout"),
    Reason.CONNECTION_LIMIT: (503, "service_unavailable"),
    Reason.NO_ROUTE: (404, "not_found"),
    Reason.UPSTREAM_UNREACHABLE: (502, "bad_gateway"),
    Reason.UPSTREAM_TIMEOUT: (504, "gateway_timeout"),
    Reason.IDP_ERROR: (503, "service_unavailable"),
    Reason.IDP_ANSWER_LOST: (503, "service_unavailable"),  # the IdP may have redeemed: next time, 401 refresh_lost
    Reason.IDP_TOKEN_UNVERIFIED: (503, "service_unavailable"),  # the successor is kept (refresh cookie rotated)
    Reason.LOCK_TIMEOUT: (503, "service_unavailable"),
    Reason.STORE_UNAVAILABLE: (503, "service_unavailable"),
    Reason.REFRESH_ERROR: (503, "service_unavailable"),
    Reason.IDP_BAD_RESPONSE: (502, "bad_gateway"),
    Reason.CAPTURE_FAILED: (502, "bad_gateway"),
    Reason.CAPTURE_TOO_LARGE: (502, "bad_gateway"),
    Reason.COOKIE_TOO_LARGE: (502, "bad_gateway"),
    Reason.REFRESH_RATE_LIMITED: (429, "too_many_requests"),
    Reason.WEBSOCKET_LIMIT: (503, "service_unavailable"),
    Reason.KEYS_UNAVAILABLE: (503, "service_unavailable"),  # the token may be fine: the JWKS is down
    Reason.INTROSPECTION_UNAVAILABLE: (503, "service_unavailable"),  # the token may be fine: its endpoint is not
}
RETRY_AFTER = b"5"
NO_STORE = (b"cache-control", b"no-store")


def status_for(reason: Reason) -> tuple[int, str]:
    return STATUS.get(reason, (401, "invalid_token"))


def wants_html(method: str, headers: RawHeaders) -> bool:
    """A browser navigation: redirect or HTML, not JSON."""
    accept = b""
    for name, value in headers:
        if name == b"sec-fetch-mode":
            return value == b"navigate"
        if name == b"x-requested-with":
            return False
        if name == b"accept":
            accept = value
    return method in ("GET", "HEAD") and b"text/html" in accept


def safe_next(path: str, query: bytes) -> str:
    """The relative URL to come back to after login (path and query of this request)."""
    target = quote(path, safe="/:@!$&'()*+,;=-._~")
    if target.startswith("//"):
        target = "/" + target.lstrip("/")
    return target + ("?" + query.decode("latin-1") if query else "")


def safe_target(value: str | None) -> str:
    """``value`` if it is a relative path on this site, else ``/`` (open-redirect defence).

    Browsers ignore tabs and newlines in URLs and treat ``\\`` like ``/``, so ``/\\evil``,
    ``/%09/evil`` or ``//evil`` would all leave the site; only a path starting with a single
    ``/`` followed by something else is kept (oauth2-proxy's redirect tests are the model).
    """
    if not value or len(value) > 2048:
        return "/"
    decoded = unquote(value)
    for candidate in (value, decoded):
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in candidate):
            return "/"
        squeezed = candidate.replace("\\", "/")
        if not squeezed.startswith("/") or squeezed.startswith("//"):
            return "/"
        if "://" in squeezed.split("?", 1)[0] or squeezed.startswith("/.."):
            return "/"
    return value


def login_location(login_url: str, next_url: str) -> str:
    return login_url.replace("{next}", quote(next_url, safe=""))


def http_date() -> bytes:
    """The Date header value, formatted at most once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True).encode()
    cached: bytes = _date_cache[1]
    return cached


_date_cache: list[Any] = [0, b""]


async def send_response(send: Send, status: int, body: bytes, headers: RawHeaders) -> None:
    """A complete small response (the server adds no Date header: upstream responses carry their own)."""
    headers = [(b"date", http_date()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: dict[str, Any], headers: RawHeaders | None = None) -> None:
    await _send_document(send, status, json.dumps(payload, separators=(",", ":")).encode(), headers or [])


async def _send_document(send: Send, status: int, body: bytes, headers: RawHeaders) -> None:
    """A JSON body already encoded."""
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send_response(send, status, body, base + headers)


async def send_denial(
    send: Send,
    reason: Reason,
    *,
    html: bool,
    route: str | None = None,
    headers: RawHeaders | None = None,
    login_url: str | None = None,
    auth_request: bool = False,
) -> None:
    """The gateway's answer for a refused request (reason codes in ``STATUS``).

    ``auth_request``: the answer goes to nginx's ``auth_request``, which takes only 401 and 403 as
    refusals: a browser's login redirect becomes a 401 with ``Location``, other client errors 403.
    """
    status, error = status_for(reason)
    extra = list(headers or [])
    if auth_request and status != 401 and 400 <= status < 500:
        status = 403
    if status == 401:
        extra.append((b"www-authenticate", b'Bearer error="invalid_token"'))
        if auth_request and html and login_url:
            extra.append((b"location", login_url.encode("latin-1")))
            html = False
        elif html and login_url:
            location = (b"location", login_url.encode("latin-1"))
            await send_response(send, 302, b"", [location, (b"content-length", b"0"), NO_STORE, *extra])
            return
    if status in (429, 503):
        extra.append((b"retry-after", RETRY_AFTER))
    extra.append(NO_STORE)
    if html:
        title = f"{status} {error.replace('_', ' ')}"
        where = f" (route {escape(route)})" if route else ""
        body = f"<!doctype html><title>{title}</title><h1>{title}</h1><p>{escape(reason)}{where}</p>\n".encode()
        base = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        await send_response(send, status, body, base + extra)
        return
    login = login_url if status == 401 else None
    document = _json_bodies.get((error, reason, route, login))
    if document is None:
        payload: dict[str, Any] = {"error": error, "reason": reason}
        if route:
            payload["route"] = route
        if login:
            payload["login_url"] = login
        document = _json_bodies.put((error, reason, route, login), json.dumps(payload, separators=(",", ":")).encode())
    await _send_document(send, status, document, extra)


# A refusal's JSON body, by (error, reason, route, login URL): most refusals repeat one of a few.
_json_bodies: BoundedCache[tuple[str, str, str | None, str | None], bytes] = BoundedCache(1024)


class Denials:
    """Refusals on the request path: counted, logged, and answered (JSON, HTML, or a redirect to login)."""

    def __init__(self, count: Callable[[str], None], login_url: str | None) -> None:
        self._count = count  # metrics: gateway_denials_total by reason
        self.login_url = login_url  # with {next}; None: no login page to send browsers to

    async def __call__(
        self,
        send: Send,
        scope: Scope,
        reason: Reason,
        route: str | None,
        cookies: list[bytes] | None = None,
        *,
        method: str | None = None,
        extra: RawHeaders | None = None,
        auth_request: bool = False,
        api: bool = False,
    ) -> int:
        """Answer ``reason``; the status sent. ``method`` overrides the scope's (a WebSocket handshake is a GET).

        ``auth_request``: for nginx's ``auth_request`` (``send_denial``), from ``{prefix}/auth``. ``api``: JSON
        whoever asks, never HTML nor a login redirect (``{prefix}/userinfo``)."""
        method = method or scope["method"]
        html = not api and wants_html(method, scope["headers"])
        login = None if api else self.location(scope)
        headers = [(b"set-cookie", c) for c in cookies or []]
        headers += extra or []
        info = scope.get("gateway")
        if info is not None:
            info.reason = reason
            headers.append((b"x-request-id", info.request_id.encode()))
        self._count(reason)
        log.info("denied %s %s route=%s reason=%s", method, scope["path"], route, reason)
        await send_denial(
            send, reason, html=html, route=route, headers=headers, login_url=login, auth_request=auth_request
        )
        status = status_for(reason)[0]
        if auth_request:
            return 403 if status != 401 and 400 <= status < 500 else status
        return 302 if status == 401 and html and login else status

    def location(self, scope: Scope) -> str | None:
        """Where a browser goes to log in and come back to this request."""
        if not self.login_url:
            return None
        return login_location(self.login_url, safe_next(scope["path"], scope["query_string"]))
