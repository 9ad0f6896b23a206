"""Token capture: a JSON login response becomes httpOnly cookies, and the page never sees the refresh token.

For legacy apps whose login endpoint answers with tokens in JSON (Django SimpleJWT's
``POST /api/token/`` -> ``{"access", "refresh"}``), a route with ``capture`` makes the gateway take
those fields out of a successful JSON response, set them as the session cookies, and send the
body on without the refresh token (and without the access token when ``keep_access: false``).

Capture fails closed: a body the gateway could not read might hold the refresh token, so it never
passes one on (``capture_plan``, then ``Capturer.take``):

    not 2xx (a refused login: 400, 401...), 3xx, 5xx       passes through unchanged
    2xx without a body (HEAD, 204, 205, Content-Length: 0)  passes through unchanged
    2xx with a Content-Encoding other than identity         502 capture_failed, body never read
    2xx whose body is not JSON (whatever its Content-Type)  502 capture_failed
    2xx JSON with the refresh field an object, list...      502 capture_failed
    2xx JSON without a refresh token (absent, null, "")     passes through unchanged
    2xx JSON with a refresh token                           captured (or 502 if the access token fails)

The HTTP path asks the upstream for ``Accept-Encoding: identity`` on capture routes, so a
compressed answer is an upstream that ignored it. With ``session.mode: server`` the captured tokens
start a server-side session (gateway.sessionauth): the answer sets the session cookie alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import CaptureConfig
from gateway.cookies import CookieJar, Headers
from gateway.errors import CookieTooLarge, StoreError
from gateway.families import Families
from gateway.reasons import Reason
from gateway.sessionauth import SessionAuth
from gateway.tokens import Verifier
from gateway.types import RawHeaders

log = logging.getLogger("gateway.capture")

MAX_CAPTURE_BYTES = 1024 * 1024


@dataclass(slots=True)
class Captured:
    """The response to send instead; ``reason`` set means refuse with that reason (502)."""

    body: bytes = b""
    headers: RawHeaders = field(default_factory=list)
    reason: Reason | None = None


def capture_plan(method: str, status: int, headers: RawHeaders) -> Literal["take", "pass"] | Reason:
    """What a capture route does with an answer: read it (``take``), pass it on as it is, or refuse it (a reason)."""
    if not 200 <= status < 300 or status in (204, 205) or method == "HEAD":
        return "pass"
    encoding = b""
    for name, value in headers:
        if name == b"content-length" and value.strip() == b"0":
            return "pass"
        if name == b"content-encoding":
            encoding = value.strip().lower()
    return "take" if encoding in (b"", b"identity") else Reason.CAPTURE_FAILED


class Capturer:
    def __init__(
        self,
        jar: CookieJar,
        verifier: Verifier,
        clock: Callable[[], float] = time.time,
        families: Families | None = None,
        sessions: SessionAuth | None = None,
    ) -> None:
        self._sessions = sessions  # session.mode: server: the tokens go to the store, one session cookie
        self._jar = jar
        self._verifier = verifier
        self._clock = clock
        self._families = families

    async def take(
        self, spec: CaptureConfig, headers: RawHeaders, body: AsyncIterator[bytes], route: str, request: Headers = ()
    ) -> Captured:
        """The login answer (``headers``, ``body``) rewritten with the session cookies; ``request``: its request's
        headers, whose stale cookie chunks are cleared."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > MAX_CAPTURE_BYTES:
                log.error("route %s: login response over %d bytes; refusing to pass it on", route, MAX_CAPTURE_BYTES)
                return Captured(reason=Reason.CAPTURE_TOO_LARGE)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return Captured(raw, _with_length(headers, len(raw)))  # nothing at all
        try:
            data: Any = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError too; nested past the parser's depth
            log.error("route %s: a 2xx login response that is not JSON; refusing to pass it on", route)
            return Captured(reason=Reason.CAPTURE_FAILED)
        refresh = data.get(spec.refresh) if isinstance(data, dict) else None
        if refresh is None or refresh == "":
            return Captured(raw, _with_length(headers, len(raw)))  # no refresh token in it: nothing to capture
        if not isinstance(refresh, str):
            log.error("route %s: the login response's %s field is not a string; refusing", route, spec.refresh)
            return Captured(reason=Reason.CAPTURE_FAILED)
        access = data.get(spec.access)
        verdict = await self._verifier.verify(access) if isinstance(access, str) else None
        if verdict is None or verdict.claims is None:
            log.error("route %s: the captured access token does not verify; no session set", route)
            return Captured(reason=Reason.IDP_BAD_RESPONSE)
        cookies = await self._cookies(str(access), refresh, verdict.claims, route, request)
        if isinstance(cookies, Reason):
            return Captured(reason=cookies)
        del data[spec.refresh]
        if not spec.keep_access:
            data.pop(spec.access, None)
        out = json.dumps(data, separators=(",", ":")).encode()
        new_headers = [(n, v) for n, v in _with_length(headers, len(out)) if n != b"cache-control"]
        new_headers += [(b"cache-control", b"no-store"), *((b"set-cookie", c) for c in cookies)]
        log.info("route %s: login captured into cookies", route)
        return Captured(out, new_headers)

    async def _cookies(
        self, access: str, refresh: str, claims: dict[str, Any], route: str, request: Headers
    ) -> list[bytes] | Reason:
        """The session's cookies: both token cookies, or with session.mode server the session cookie alone."""
        if self._sessions is not None:
            try:
                return [await self._sessions.start(access, refresh, None, claims)]
            except StoreError as exc:
                log.error("route %s: store unavailable, no session started (%s)", route, exc)
                return Reason.STORE_UNAVAILABLE
        lifetime = self._jar.refresh_lifetime(refresh, self._clock())
        try:  # the request's stale cookie chunks are cleared too
            cookies = self._jar.expand(self._jar.session(access, refresh, lifetime), request)
        except CookieTooLarge as exc:
            log.error("route %s: %s; no session set", route, exc)
            return Reason.COOKIE_TOO_LARGE
        if self._families is not None:
            await self._families.started(claims, refresh, lifetime)
        return cookies


def _with_length(headers: RawHeaders, length: int) -> RawHeaders:
    return [(n, v) for n, v in headers if n != b"content-length"] + [(b"content-length", str(length).encode())]
