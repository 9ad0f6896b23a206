"""Token capture: a JSON login response becomes httpOnly cookies, and the page never sees the refresh token.

For legacy apps whose login endpoint answers with tokens in JSON (Django SimpleJWT's
``POST /api/token/`` -> ``{"access", "refresh"}``), a route with ``capture`` makes the gateway take
those fields out of a successful JSON response, set them as the session cookies, and send the
body on without the refresh token (and without the access token when ``keep_access: false``).
Anything else (an error status, a non-JSON body) passes through untouched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import CaptureConfig
from gateway.cookies import CookieJar
from gateway.errors import CookieTooLarge
from gateway.families import Families
from gateway.reasons import Reason
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


def wants_capture(status: int, headers: RawHeaders) -> bool:
    content_type = encoding = b""
    for name, value in headers:
        if name == b"content-type":
            content_type = value.lower()
        elif name == b"content-encoding":
            encoding = value.strip().lower()
    return 200 <= status < 300 and b"json" in content_type and encoding in (b"", b"identity")


class Capturer:
    def __init__(
        self,
        jar: CookieJar,
        verifier: Verifier,
        clock: Callable[[], float] = time.time,
        families: Families | None = None,
    ) -> None:
        self._jar = jar
        self._verifier = verifier
        self._clock = clock
        self._families = families

    async def take(self, spec: CaptureConfig, headers: RawHeaders, body: AsyncIterator[bytes], route: str) -> Captured:
        chunks: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > MAX_CAPTURE_BYTES:
                log.error("route %s: login response over %d bytes; refusing to pass it on", route, MAX_CAPTURE_BYTES)
                return Captured(reason=Reason.CAPTURE_TOO_LARGE)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data: Any = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get(spec.refresh), str):
            return Captured(raw, _with_length(headers, len(raw)))  # nothing to capture
        access, refresh = data.get(spec.access), data[spec.refresh]
        verdict = await self._verifier.verify(access) if isinstance(access, str) else None
        if verdict is None or verdict.claims is None:
            log.error("route %s: the captured access token does not verify; no session set", route)
            return Captured(reason=Reason.IDP_BAD_RESPONSE)
        lifetime = self._jar.refresh_lifetime(refresh, self._clock())
        try:
            cookies = self._jar.session(str(access), refresh, lifetime)
        except CookieTooLarge as exc:
            log.error("route %s: token too large for the %s cookie (over 4 KB); no session set", route, exc)
            return Captured(reason=Reason.COOKIE_TOO_LARGE)
        if self._families is not None:
            await self._families.started(verdict.claims, refresh, lifetime)
        del data[spec.refresh]
        if not spec.keep_access:
            data.pop(spec.access, None)
        out = json.dumps(data, separators=(",", ":")).encode()
        new_headers = [(n, v) for n, v in _with_length(headers, len(out)) if n != b"cache-control"]
        new_headers += [(b"cache-control", b"no-store"), *((b"set-cookie", c) for c in cookies)]
        log.info("route %s: login captured into cookies", route)
        return Captured(out, new_headers)


def _with_length(headers: RawHeaders, length: int) -> RawHeaders:
    return [(n, v) for n, v in headers if n != b"content-length"] + [(b"content-length", str(length).encode())]
