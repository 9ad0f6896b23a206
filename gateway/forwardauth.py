"""Forward-auth: ``{prefix}/auth`` decides for a front proxy that forwards by itself.

nginx ``auth_request``, Caddy ``forward_auth``, Traefik ForwardAuth and Envoy ``ext_authz`` (HTTP)
ask before forwarding a request; the gateway runs the request path's checks on the request they
describe, without forwarding it:

    original   method, URI and host: X-Original-Method / X-Original-URI (nginx) or
               X-Forwarded-Method / -Uri / -Host (Traefik, Caddy), believed only from
               ``server.trusted_proxies``; or the path after ``{prefix}/auth`` (Envoy's path_prefix)
    route      the same route table, canonical path and Host rules as proxy mode
    admit      the same CSRF, credential, refresh (single flight), denylist and claim rules
    answer     200 with the identity headers (for the proxy to copy upstream) and any rotated
               Set-Cookie (for the proxy to copy to the client); or the refusal proxy mode gives

nginx's ``auth_request`` takes only 2xx, 401 and 403 (anything else is a 500), so a request that
names its URI with X-Original-URI gets refusals in that form: no redirect (a 401 carries the login
URL in ``Location`` for the proxy's ``error_page`` to use) and 403 for the other client errors.
nginx's variables also see only the first of several headers of one name, so such an answer
carries each ``Set-Cookie`` a second time as ``X-Gateway-Set-Cookie-1``, ``-2``... for
``auth_request_set`` to pick up one by one.
"""

from __future__ import annotations

import logging
import time

from gateway.accesslog import AccessLog, RequestIds, RequestInfo
from gateway.admission import PREFLIGHT, Admission, Admitted
from gateway.assertion import Assertion
from gateway.config.assertion import DEFAULT_HEADER
from gateway.cors import is_preflight
from gateway.headers import HeaderRules, TrustedProxies
from gateway.heads import Scanned
from gateway.http import METHODS
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.responses import NO_STORE, Denials, send_response
from gateway.routing import CanonicalPaths, Route, RouteLookup, RouteTable
from gateway.types import RawHeaders, Receive, Scope, Send

log = logging.getLogger("gateway")

_NGINX = (b"x-original-uri", b"x-original-method")
_FORWARDED = (b"x-forwarded-uri", b"x-forwarded-method")


class Original:
    """The request a front proxy asks about, or why it cannot be known."""

    __slots__ = ("method", "uri", "nginx", "refused")

    def __init__(self, method: str, uri: bytes | None, nginx: bool, refused: Reason | None = None) -> None:
        self.method, self.uri, self.nginx, self.refused = method, uri, nginx, refused


def original_request(scope: Scope, endpoint: str, trusted: bool) -> Original:
    """The request the front proxy asks about, named one way only.

    From a trusted proxy: nginx's ``X-Original-*`` or the ``X-Forwarded-Method``/``-Uri`` of Caddy and
    Traefik; else Envoy's path after the endpoint. Caddy and Traefik pass the client's own headers
    along, nginx and Envoy may too: a question that names the original request twice (both header
    families, headers and a path, one header twice) is refused, so that a client's header never
    outvotes the proxy's. Such headers from an untrusted peer are refused too, never ignored.
    """
    found: dict[bytes, bytes] = {}
    twice = False
    for name, value in scope["headers"]:
        if name in _NGINX or name in _FORWARDED:
            twice = twice or name in found
            found[name] = value
    suffix = _suffix(scope, endpoint)
    nginx = any(name in found for name in _NGINX)
    if not found:
        return Original(scope["method"], suffix, False, None if suffix else Reason.INVALID_REQUEST)
    if not trusted:
        return Original(scope["method"], None, nginx, Reason.UNTRUSTED_PROXY)
    if twice or suffix is not None or (nginx and any(name in found for name in _FORWARDED)):
        log.warning("forward-auth: the original request is named more than once; refusing")
        return Original(scope["method"], None, nginx, Reason.INVALID_REQUEST)
    uri_name, method_name = _NGINX if nginx else _FORWARDED
    uri, method = found.get(uri_name), found.get(method_name)
    verb = method.decode("latin-1").upper() if method else scope["method"]
    return Original(verb, uri, nginx, None if uri else Reason.INVALID_REQUEST)


def _suffix(scope: Scope, endpoint: str) -> bytes | None:
    """Envoy's form: ``{prefix}/auth/original/path`` with the original query."""
    path: str = scope["path"]
    if len(path) <= len(endpoint):
        return None
    raw: bytes = scope.get("raw_path") or path.encode()
    rest = raw[len(endpoint.encode()) :]
    query: bytes = scope.get("query_string", b"")
    return rest + (b"?" + query if query else b"")


class ForwardAuth:
    """``{prefix}/auth`` (and ``{prefix}/auth/...``) for one config generation."""

    def __init__(
        self,
        *,
        endpoint: str,
        routes: RouteTable,
        admission: Admission,
        header_rules: HeaderRules,
        trusted: TrustedProxies,
        deny: Denials,
        metrics: Metrics,
        access_log: AccessLog,
        request_ids: RequestIds,
        forward_token: bool,
        identity_names: list[bytes],
        assertion: Assertion | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._routes = routes
        self._admission = admission
        self._headers = header_rules
        self._trusted = trusted
        self._deny = deny
        self._metrics = metrics
        self._access_log = access_log
        self._request_ids = request_ids
        self._forward_token = forward_token
        self._assertion = assertion  # identity.assertion: in the 200, for the proxy to copy upstream
        # The assertion's header is in every 200 too, empty without identity.assertion: the documented
        # proxy configs copy it unconditionally, overwriting a client's own.
        signed = assertion.name if assertion else DEFAULT_HEADER
        self._identity_names = identity_names + [signed.lower().encode()]
        self._paths = CanonicalPaths()
        self._lookup = RouteLookup(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        info = RequestInfo()
        seen = Scanned(scope["headers"])
        info.identify(seen.request_id, self._request_ids)
        peer = scope.get("client")
        original = original_request(scope, self.endpoint, peer is not None and peer[0] in self._trusted)
        asked = dict(scope, method=original.method, gateway=info)  # the request as the client sent it
        route_name, status = await self._decide(asked, send, original, seen)
        elapsed = time.perf_counter() - started
        # Counted as a request of its route, by the original method: the same dashboards serve both modes.
        self._metrics.request(route_name, original.method if original.method in METHODS else "OTHER", status, elapsed)
        if self._access_log.enabled:
            self._access_log.write(original.method, asked["path"], info, route_name, status, elapsed)

    async def _decide(self, asked: Scope, send: Send, original: Original, seen: Scanned) -> tuple[str, int]:
        if original.refused is not None:
            if original.refused is Reason.UNTRUSTED_PROXY:
                log.warning(
                    "forward-auth: %s sent X-Original-*/X-Forwarded-* headers but is not in server.trusted_proxies;"
                    " refusing",
                    asked["client"][0] if asked.get("client") else "?",
                )
            return "-", await self._refuse(send, asked, original, original.refused, None)
        found = self._route(asked, original.uri or b"/", seen)
        if isinstance(found, Reason):
            return "-", await self._refuse(send, asked, original, found, None)
        route = found
        if route.capture is not None:
            # The login answer would go from the upstream to the page through the proxy, refresh token and all.
            log.error("forward-auth: route %s has capture, which needs the gateway to forward; refusing", route.name)
            return route.name, await self._refuse(send, asked, original, Reason.PROXY_MODE_ONLY, route)
        if (route.cors is not None or route.preflight) and is_preflight(asked):
            # A CORS preflight carries no credentials: allowed as nobody, for the proxy or the app to answer.
            origin = next((value for name, value in asked["headers"] if name == b"origin"), None)
            if route.cors is not None and not route.cors.allowed(origin):
                return route.name, await self._refuse(send, asked, original, Reason.CORS_ORIGIN, route)
            await send_response(send, 200, b"", self._granted(PREFLIGHT, asked["gateway"], route))
            return route.name, 200
        if original.method not in route.methods:
            extra = [(b"allow", route.allow)]
            return route.name, await self._refuse(send, asked, original, Reason.METHOD_NOT_ALLOWED, route, extra=extra)
        admitted = await self._admit(asked, route, seen)
        if admitted.refused is not None:
            return route.name, await self._refuse(
                send, asked, original, admitted.refused, route, cookies=admitted.set_cookies
            )
        headers = self._granted(admitted, asked["gateway"], route)
        if original.nginx:
            headers += numbered_cookies(admitted.set_cookies)
        await send_response(send, 200, b"", headers)
        return route.name, 200

    async def _admit(self, asked: Scope, route: Route, seen: Scanned) -> Admitted:
        if any(name == b"sec-websocket-key" for name, _ in asked["headers"]):
            # A WebSocket handshake (its key is end to end; Upgrade is not): checked as proxy mode checks
            # one, cookie sessions only from their own site (cross-site WebSocket hijacking).
            return await self._admission.websocket(asked, route)
        known = self._admission.known(asked, route, seen.authorization, seen.authorizations, seen.cookies)
        return known if known is not None else await self._admission.http(asked, route)

    def _granted(self, admitted: Admitted, info: RequestInfo, route: Route) -> RawHeaders:
        """The 200's headers: identity (and the assertion) for the upstream, rotated cookies for the client."""
        out: RawHeaders = [(b"content-length", b"0"), NO_STORE, (b"x-request-id", info.request_id.encode())]
        identity = [(name.encode("ascii"), value.encode("utf-8")) for name, value in admitted.identity]
        claims = admitted.claims
        if claims is not None:
            info.subject, info.refreshed = claims.get("sub"), admitted.refreshed
            if self._forward_token and admitted.token:
                out.append((b"authorization", b"Bearer " + admitted.token.encode("ascii")))
            if self._assertion is not None:
                name, value = self._assertion.header(admitted.token, claims, route)
                identity.append((name.lower().encode("ascii"), value.encode("ascii")))
        # Every identity header, empty when there is no such claim (or no user): a proxy that copies
        # a header the answer lacks may leave the client's own in place, or a placeholder (Caddy 2.6).
        given = {name for name, _ in identity}
        out += identity + [(name, b"") for name in self._identity_names if name not in given]
        out += [(b"set-cookie", cookie) for cookie in admitted.set_cookies or ()]
        return out

    def _route(self, asked: Scope, uri: bytes, seen: Scanned) -> Route | Reason:
        """The route of the original request (its path, query and host written into ``asked``)."""
        if b"#" in uri:  # nginx passes "/admin#/x" on as it came: the app reads the path /admin, another route's
            return Reason.BAD_PATH
        raw_path, _, query = uri.partition(b"?")
        canonical = self._paths(raw_path)
        if canonical is None:
            return Reason.BAD_PATH
        asked["path"], asked["raw_path"], asked["query_string"] = canonical[0], raw_path, query
        if seen.hosts > 1:
            return Reason.BAD_HOST
        client = asked.get("client")
        origin = self._headers.origin(asked["headers"], client[0] if client else None, asked.get("scheme", "http"))
        authority = origin.partition("://")[2].encode("latin-1")
        name = self._lookup.host(authority) if authority else None
        if authority and name is None:
            return Reason.BAD_HOST
        return self._lookup.route(name, canonical[0])

    async def _refuse(
        self,
        send: Send,
        asked: Scope,
        original: Original,
        reason: Reason,
        route: Route | None,
        *,
        cookies: list[bytes] | None = None,
        extra: RawHeaders | None = None,
    ) -> int:
        name = route.name if route is not None else None
        if original.nginx and cookies:
            extra = [*(extra or ()), *numbered_cookies(cookies)]
        return await self._deny(send, asked, reason, name, cookies, extra=extra, auth_request=original.nginx)


def numbered_cookies(cookies: list[bytes] | None) -> RawHeaders:
    """Each Set-Cookie again under a name of its own, for nginx (see the module docstring)."""
    return [(b"x-gateway-set-cookie-%d" % number, cookie) for number, cookie in enumerate(cookies or (), 1)]
