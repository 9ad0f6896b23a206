"""Cross-origin requests on one route (``routes[].cors``, ``routes[].preflight``), compiled once per generation.

    preflight  an ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method`` (the Fetch standard's
               CORS-preflight request). Browsers send it without cookies or Authorization, so it can never
               authenticate: with ``cors`` the gateway answers it here (204 with the policy, or 403
               ``cors_origin`` for an origin the policy does not allow) and the upstream never sees it; with
               ``preflight: upstream`` it is forwarded as nobody (http.HttpPath skips admission for it)
    answers    every other answer on a ``cors`` route, the upstream's and the gateway's own refusals alike:
               the upstream's ``Access-Control-*`` headers dropped, the policy's added for an allowed
               ``Origin``, and ``Vary: Origin``
    CSRF       with ``allow_credentials``, the allowed origins may send cookie-authenticated unsafe requests
               on the route (``trusted``, read by admission.Admission through csrf.CSRFGuard)

The request path pays nothing for this on routes without ``cors`` or ``preflight: upstream``: ``Origin`` is
only looked for on those.
"""

from __future__ import annotations

from gateway.config import CORSConfig
from gateway.csrf import origin_of
from gateway.reasons import Reason
from gateway.responses import Denials, send_response
from gateway.types import Message, RawHeaders, Scope, Send

_ALLOW_ORIGIN = b"access-control-allow-origin"
_CREDENTIALS = (b"access-control-allow-credentials", b"true")
_VARY_ORIGIN = (b"vary", b"Origin")
# The preflight's answer depends on its Origin alone; naming the other two keeps a cache that stores
# preflights from answering one with another's (the Fetch standard's advice for servers that may vary them).
_VARY_PREFLIGHT = (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")


def is_preflight(scope: Scope) -> bool:
    """An ``OPTIONS`` with both ``Origin`` and ``Access-Control-Request-Method``: a plain OPTIONS is a request."""
    if scope["method"] != "OPTIONS":
        return False
    origin = method = False
    for name, _ in scope["headers"]:
        if name == b"origin":
            origin = True
        elif name == b"access-control-request-method":
            method = True
    return origin and method


def _origin(headers: RawHeaders) -> bytes | None:
    return next((value for name, value in headers if name == b"origin"), None)


class CORSPolicy:
    """One route's ``cors``: preflights answered, CORS headers on every answer, origins trusted for CSRF."""

    def __init__(self, config: CORSConfig, route_methods: tuple[str, ...]) -> None:
        self._any = "*" in config.allowed_origins  # never with credentials (config.cors)
        self._origins = frozenset(o for o in (origin_of(a) for a in config.allowed_origins if a != "*") if o)
        # Origins trusted with the session for unsafe requests: only those allowed to send credentials.
        self.trusted = self._origins if config.allow_credentials else frozenset()
        methods = config.allowed_methods or route_methods
        preflight = [(b"access-control-allow-methods", ", ".join(methods).encode())]
        if config.allowed_headers:
            preflight.append((b"access-control-allow-headers", ", ".join(config.allowed_headers).encode()))
        preflight.append((b"access-control-max-age", str(config.max_age).encode()))
        answer = []
        if config.expose_headers:
            answer.append((b"access-control-expose-headers", ", ".join(config.expose_headers).encode()))
        if config.allow_credentials:
            preflight.append(_CREDENTIALS)
            answer.append(_CREDENTIALS)
        self._preflight = preflight
        self._answer = answer
        self._wildcard = [(_ALLOW_ORIGIN, b"*"), *answer]  # any origin, without credentials: no Vary needed

    def allowed(self, origin: bytes | None) -> bool:
        """Whether a page of ``origin`` (the request's ``Origin``) may read this route's answers."""
        return origin is not None and (self._any or origin.decode("latin-1") in self._origins)

    async def preflight(self, scope: Scope, send: Send, deny: Denials, route: str) -> int:
        """Answer a preflight (never forwarded): 204 with the policy, or 403 ``cors_origin``; the status sent."""
        origin = _origin(scope["headers"])
        if origin is None or not self.allowed(origin):
            return await deny(send, scope, Reason.CORS_ORIGIN, route)
        allow = b"*" if self._any else origin
        headers = [(_ALLOW_ORIGIN, allow), *self._preflight, _VARY_PREFLIGHT]
        info = scope.get("gateway")
        if info is not None:
            headers.append((b"x-request-id", info.request_id.encode()))
        await send_response(send, 204, b"", headers)
        return 204

    def headers(self, origin: bytes | None) -> RawHeaders:
        """The CORS headers of an answer (not a preflight's) to a request with ``origin``."""
        if self._any:  # on every answer, Origin or not: a shared cache may hand one to any page
            return self._wildcard
        if origin is None or not self.allowed(origin):
            return [_VARY_ORIGIN]
        return [(_ALLOW_ORIGIN, origin), *self._answer, _VARY_ORIGIN]

    def wrap(self, scope: Scope, send: Send) -> Send:
        """``send`` with this policy's headers on the answer's head, in place of the upstream's own CORS headers."""
        add = self.headers(_origin(scope["headers"]))

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(n, v) for n, v in message["headers"] if not n.lower().startswith(b"access-control-")]
                message = {**message, "headers": kept + add}
            await send(message)

        return send_with_cors
