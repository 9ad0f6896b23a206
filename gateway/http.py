"""The HTTP request path, from the first byte of headers to the last byte of the answer.

    identify   X-Request-ID (the client's when sane, else a new one)       accesslog.RequestInfo
    path       canonical form; an ambiguous path is 400                    routing.canonical_path
    route      by host and path prefix; none is 404                        routing.RouteTable
    CORS       a cors route's preflight answered, its CORS headers set     cors.CORSPolicy
    size       a Content-Length over the route's max_body is 413           bodies.declared_too_large
    admit      CSRF, credential, refresh, claims, identity headers         admission.Admission
               (a preflight: upstream route's preflight skips it)
    rewrite    the request's headers as the upstream gets them             headers.HeaderRules.upstream
    forward    streamed both ways; 502 / 504; a body cut at max_body: 413  forwarder.Forwarder, bodies.RequestBody
    answer     upstream headers filtered, rotated cookies added, or a      headers.HeaderRules.outbound,
               login route's JSON tokens turned into cookies               capture.Capturer

Every refusal goes through ``responses.Denials``. The path is plain ASGI with direct ``send``
calls: it is the hot path, measured by bench/proxy_bench.py.
"""

from __future__ import annotations

import logging
import time

from yarl import URL

from gateway.accesslog import AccessLog, RequestIds, RequestInfo
from gateway.admission import PREFLIGHT, Admission, Admitted
from gateway.assertion import Assertion
from gateway.bodies import RequestBody, declared_too_large
from gateway.cache import BoundedCache
from gateway.capture import Capturer, capture_plan
from gateway.client_h1 import client_gone
from gateway.cors import is_preflight
from gateway.errors import BadHeader, UpstreamFailure
from gateway.forwarder import Forwarder, UpstreamResponse, chunks, upstream_url
from gateway.headers import HeaderRules
from gateway.heads import Scanned
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.responses import NO_STORE, Denials
from gateway.routing import CanonicalPaths, Route, RouteLookup, RouteTable, told_another_host
from gateway.tracing import Tracer
from gateway.types import RawHeaders, Receive, Scope, Send, StrHeaders

log = logging.getLogger("gateway")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: "OTHER" in metrics
_CLOSE = [(b"connection", b"close")]  # after a 413: the rest of the body is not read
# Answers that never have content (RFC 9110 §6.4.1), whatever their Content-Length says: a 304's is the length of the
# 200 it stands for (§8.6). uvicorn waited for that many bytes, then failed the answer and cut the connection.
_BODILESS = (204, 304)


class HttpPath:
    """One config generation's HTTP path (see the module docstring for its stages)."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        admission: Admission,
        header_rules: HeaderRules,
        forwarder: Forwarder,
        capturer: Capturer,
        deny: Denials,
        metrics: Metrics,
        tracer: Tracer,
        access_log: AccessLog,
        request_ids: RequestIds,
        assertion: Assertion | None = None,
    ) -> None:
        self._assertion = assertion  # identity.assertion: a signed JWT on authenticated requests
        self._routes = routes
        self._admission = admission
        self._headers = header_rules
        self._forwarder = forwarder
        self._capturer = capturer
        self._deny = deny
        self._metrics = metrics
        self._tracer = tracer
        self._access_log = access_log
        self._request_ids = request_ids
        self._paths = CanonicalPaths()
        self._lookup = RouteLookup(routes)
        self._urls: BoundedCache[tuple[str, str], URL] = BoundedCache()  # (route, canonical path) -> URL, no query

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        scope["gateway"] = info = RequestInfo()
        if self._tracer.enabled:
            with self._tracer.span("gateway.request", method=scope["method"]) as span:
                route_name, status = await self._serve(scope, receive, send, info)
                span.set_attribute("gateway.route", route_name)
                span.set_attribute("http.response.status_code", status)
        else:
            route_name, status = await self._serve(scope, receive, send, info)
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        elapsed = time.perf_counter() - started
        self._metrics.request(route_name, method, status, elapsed)
        if self._access_log.enabled:
            self._access_log.write(scope["method"], scope["path"], info, route_name, status, elapsed)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, info: RequestInfo) -> tuple[str, int]:
        """Route, admit, forward, answer: (route name or "-", status sent)."""
        seen = Scanned(scope["headers"])
        info.identify(seen.request_id, self._request_ids)
        if seen.coded:  # the body is de-chunked only: "gzip, chunked" would reach the upstream as plain bytes
            return "-", await self._deny(send, scope, Reason.UNSUPPORTED_CODING, None)
        found = self._route(scope, seen)
        if isinstance(found, Reason):
            return "-", await self._deny(send, scope, found, None)
        route, path = found
        if route.cors is not None:  # gateway.cors: a preflight is answered here, every other answer gets CORS headers
            if is_preflight(scope):
                return route.name, await route.cors.preflight(scope, send, self._deny, route.name)
            send = route.cors.wrap(scope, send)
        if scope["method"] not in route.methods:
            allow = [(b"allow", route.allow)]
            return route.name, await self._deny(send, scope, Reason.METHOD_NOT_ALLOWED, route.name, extra=allow)
        if route.max_body is not None and declared_too_large(seen.length, route.max_body):
            return route.name, await self._deny(send, scope, Reason.BODY_TOO_LARGE, route.name, extra=_CLOSE)
        if route.preflight and is_preflight(scope):  # preflight: upstream: forwarded as nobody (gateway.cors)
            admitted: Admitted | None = PREFLIGHT
        else:
            admitted = self._admission.known(scope, route, seen.authorization, seen.authorizations, seen.cookies)
        if admitted is None:
            admitted = await self._admission.http(scope, route)
        if admitted.refused is not None:
            return route.name, await self._deny(send, scope, admitted.refused, route.name, admitted.set_cookies)
        try:
            url, headers = self._request(scope, route, path, seen, admitted, info)
        except BadHeader as exc:
            log.info("route %s: header %s is not UTF-8; refusing", route.name, exc)
            return route.name, await self._deny(send, scope, Reason.BAD_HEADER, route.name, admitted.set_cookies)
        body = RequestBody(receive, route.max_body) if seen.has_body else None
        forwarding = self._forwarder.send(
            scope["method"],
            url,
            headers,
            body,
            connect_timeout=route.connect_timeout,
            read_timeout=route.read_timeout,
            tls=route.tls,
        )
        started = time.perf_counter()
        try:
            if self._tracer.enabled:
                with self._tracer.span("gateway.upstream", route=route.name):
                    response = await forwarding
            else:
                response = await forwarding  # no span, not even a no-op one: this is the hot path
        except UpstreamFailure as exc:
            if body is not None and body.too_large:  # cut by us, not the upstream's failure
                return route.name, await self._deny(
                    send, scope, Reason.BODY_TOO_LARGE, route.name, admitted.set_cookies, extra=_CLOSE
                )
            log.warning("route %s: %s", route.name, exc)
            reason = Reason.UPSTREAM_TIMEOUT if exc.timeout else Reason.UPSTREAM_UNREACHABLE
            return route.name, await self._deny(send, scope, reason, route.name, admitted.set_cookies)
        info.upstream = time.perf_counter() - started
        self._metrics.upstream(route.name, info.upstream)
        return route.name, await self._answer(scope, send, route, response, admitted, info)

    def _request(
        self, scope: Scope, route: Route, path: str, seen: Scanned, admitted: Admitted, info: RequestInfo
    ) -> tuple[URL, StrHeaders]:
        """The URL and headers the upstream gets."""
        claims = admitted.claims
        headers = self._headers.upstream(
            scope,
            host=seen.host,
            identity=admitted.identity,
            info=info,
            token=admitted.token if claims is not None else None,
            # A client's own Authorization goes upstream only where nothing is checked, or when
            # it is the very token the gateway verified: an app must not act on one it never saw checked.
            authorization=(route.auth == "none" and admitted is not PREFLIGHT)
            or (admitted.bearer and claims is not None),
            connection=seen.connection,
            client_request_id=seen.request_id is not None,
        )
        if claims is not None:
            info.subject = claims.get("sub")
            info.refreshed = admitted.refreshed
            if self._assertion is not None:
                headers.append(self._assertion.header(admitted.token, claims, route))
        if route.capture is not None:
            # The login response is read and rewritten here, so it must come back unencoded: said
            # explicitly, since a request without Accept-Encoding accepts any coding (RFC 9110 §12.5.3).
            headers = [(n, v) for n, v in headers if n != "accept-encoding"]
            headers.append(("accept-encoding", "identity"))
        return self._url(route, path, scope["query_string"]), headers

    def _route(self, scope: Scope, seen: Scanned) -> tuple[Route, str] | Reason:
        """The route and the canonical path to forward, or why there is none."""
        host = seen.host
        name: str | None = None
        if seen.hosts > 1 or (host is None and scope.get("http_version") == "1.1"):
            return Reason.BAD_HOST  # RFC 9112 §3.2: exactly one Host in HTTP/1.1
        if host is not None and (name := self._lookup.host(host)) is None:
            return Reason.BAD_HOST
        if self._lookup.routes.by_host:
            client = scope.get("client")
            if told_another_host(self._headers.forwarded_hosts(scope["headers"], client[0] if client else None), name):
                return Reason.BAD_HOST
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        canonical = self._paths(raw_path)
        if canonical is None:
            return Reason.BAD_PATH
        route = self._lookup.route(name, canonical[0])
        return route if isinstance(route, Reason) else (route, canonical[1])

    def _url(self, route: Route, path: str, query: bytes) -> URL:
        up = route.upstream
        if query:
            return upstream_url(f"{up.scheme}://{up.netloc}{up.base_path}{path}?{query.decode('latin-1')}")
        url = self._urls.get((route.name, path))
        if url is None:
            url = self._urls.put((route.name, path), upstream_url(f"{up.scheme}://{up.netloc}{up.base_path}{path}"))
        return url

    async def _answer(
        self, scope: Scope, send: Send, route: Route, response: UpstreamResponse, admitted: Admitted, info: RequestInfo
    ) -> int:
        """The upstream's answer, streamed to the client with the gateway's cookies; the status sent."""
        if response.status < 200:  # a 101 (no request here asks to switch: Upgrade is hop-by-hop, never sent)
            # Passed on, it told the client, or a proxy in front, that the connection speaks another protocol now.
            log.warning(
                "route %s: the upstream answered %d to a request that asked for no upgrade", route.name, response.status
            )
            response.close()
            return await self._deny(send, scope, Reason.UPSTREAM_UNREACHABLE, route.name, admitted.set_cookies)
        out = self._headers.outbound(response.headers, route.name)
        if response.status in _BODILESS:
            out = [(name, value) for name, value in out if name != b"content-length"]
        out.append((b"x-request-id", info.request_id.encode()))
        set_cookies = admitted.set_cookies
        if route.capture is not None:
            status = await self._capture(scope, send, route, response, out, set_cookies)
            if status is not None:
                return status
        if set_cookies:
            out.extend((b"set-cookie", c) for c in set_cookies)
            if info.refreshed:
                out = [(n, v) for n, v in out if n != b"cache-control"]
                out.append(NO_STORE)
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        try:
            # Each chunk goes out as it comes; the last one with more_body=False, which saves a
            # send (and a write) per response. Most responses are one chunk, read once.
            chunk = await response.read()
            while chunk and not response.at_eof():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if client_gone(scope):  # a stream with no end would be read on, its connection held, for good
                    response.close()  # the upstream's connection closes: its stream ends there
                    return response.status
                chunk = await response.read()
        except UpstreamFailure as exc:
            # Headers are gone already; all we can do is cut the connection so the client sees it.
            log.warning("route %s: upstream failed mid-response: %s", route.name, exc)
            response.close()
            return response.status
        await send({"type": "http.response.body", "body": chunk})
        return response.status

    async def _capture(
        self,
        scope: Scope,
        send: Send,
        route: Route,
        response: UpstreamResponse,
        out: RawHeaders,
        set_cookies: list[bytes] | None,
    ) -> int | None:
        """A capture route's answer, rewritten or refused (the status sent); None: pass it on as it came."""
        plan = capture_plan(scope["method"], response.status, out)
        if plan == "pass" or route.capture is None:
            return None
        if isinstance(plan, Reason):
            log.error("route %s: a compressed login response (Content-Encoding); refusing to pass it on", route.name)
            response.close()
            return await self._deny(send, scope, plan, route.name, set_cookies)
        captured = await self._capturer.take(route.capture, out, chunks(response), route.name, scope["headers"])
        if captured.reason is not None:
            response.close()
            return await self._deny(send, scope, captured.reason, route.name, set_cookies)
        await send({"type": "http.response.start", "status": response.status, "headers": captured.headers})
        await send({"type": "http.response.body", "body": captured.body})
        return response.status
