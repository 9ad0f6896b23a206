"""The WebSocket path: the handshake is admitted like a request, then the socket is tunnelled.

    identify   X-Request-ID                                             accesslog.RequestInfo
    path       canonical form (400), never an internal endpoint (404)   routing.canonical_path
    route      by host and path prefix (404); a free slot (503)         routing.RouteTable, tunnel.Sockets
    admit      Origin check for cookie sessions, credential, refresh,   admission.Admission.websocket
               claims, identity headers
    connect    the upstream handshake with the identity headers;        tunnel.open_upstream
               its refusal goes back as it was
    relay      messages both ways until either side closes, or the      relay.relay, tunnel.Sockets
               watchdog ends the socket (logout, expiry, idle)

A refusal is an HTTP answer sent with the ASGI ``websocket.http.response`` extension (never an
accepted socket closed at once); a server without it answers 403. For denials and the access
log a handshake is a GET. The access log line is written when the socket closes.
"""

from __future__ import annotations

import logging
import time

from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

from gateway.accesslog import AccessLog, RequestIds, RequestInfo
from gateway.admission import Admission, Admitted
from gateway.assertion import Assertion
from gateway.config import WebSocketConfig
from gateway.errors import BadHeader, BadPath
from gateway.families import Families
from gateway.headers import HeaderRules
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.relay import relay
from gateway.responses import Denials
from gateway.routing import Route, RouteTable, canonical_path, host_name, told_another_host
from gateway.tls import tls_failure
from gateway.tunnel import Slot, Sockets, Tunnel, as_http, open_upstream
from gateway.types import Message, RawHeaders, Receive, Scope, Send
from gateway.upstream_ws import UpstreamSocket

log = logging.getLogger("gateway")

_FRAMING = (b"content-length", b"transfer-encoding")

Ending = tuple[str, int, str | None]  # route name, status, who closed the socket (None: never opened)


class WebSocketPath:
    """One config generation's WebSocket path (see the module docstring for its stages)."""

    def __init__(
        self,
        *,
        prefix: str,
        routes: RouteTable,
        admission: Admission,
        header_rules: HeaderRules,
        sockets: Sockets,
        families: Families,
        limits: WebSocketConfig,
        deny: Denials,
        metrics: Metrics,
        access_log: AccessLog,
        request_ids: RequestIds,
        assertion: Assertion | None = None,
    ) -> None:
        self._assertion = assertion
        self._prefix = prefix
        self._routes = routes
        self._admission = admission
        self._headers = header_rules
        self._sockets = sockets
        self._families = families
        self._limits = limits
        self._deny_http = deny
        self._metrics = metrics
        self._access_log = access_log
        self._request_ids = request_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        started = time.perf_counter()
        scope["gateway"] = info = RequestInfo()
        client_id = next((v for n, v in scope["headers"] if n == b"x-request-id"), None)
        info.identify(client_id, self._request_ids)
        if "websocket.http.response" in scope.get("extensions", {}):
            respond = as_http(send)
        else:
            respond = _refuse_handshake(send)  # no denial responses here: the server answers 403
        route_name, status, closed_by = "-", 101, None
        try:
            route_name, status, closed_by = await self._handshake(scope, receive, send, respond, info)
        finally:
            # The handshake is the request (its latency is what the histogram shows); the access
            # log line is written when the socket closes, with how long it lived.
            ended = time.perf_counter()
            self._metrics.request(route_name, "WEBSOCKET", status, (info.answered or ended) - started)
            if self._access_log.enabled:
                self._access_log.write("GET", scope["path"], info, route_name, status, ended - started)
            if closed_by is not None:
                log.info("websocket closed route=%s by=%s after %.1fs", route_name, closed_by, ended - started)

    async def _deny(
        self,
        respond: Send,
        scope: Scope,
        reason: Reason,
        route: Route | None,
        cookies: list[bytes] | None = None,
        extra: RawHeaders | None = None,
    ) -> Ending:
        name = route.name if route else None
        status = await self._deny_http(respond, scope, reason, name, cookies, method="GET", extra=extra)
        return (route.name if route else "-"), status, None

    async def _handshake(self, scope: Scope, receive: Receive, send: Send, respond: Send, info: RequestInfo) -> Ending:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        try:
            decoded, path = canonical_path(raw_path)
        except BadPath:
            return await self._deny(respond, scope, Reason.BAD_PATH, None)
        if decoded == self._prefix or decoded.startswith(self._prefix + "/"):
            return await self._deny(respond, scope, Reason.NO_ROUTE, None)  # internal endpoints are HTTP
        hosts = [v for n, v in scope["headers"] if n == b"host"]
        host = hosts[0] if len(hosts) == 1 else None
        name = host_name(host) if host is not None else None
        if name is None:  # a handshake is HTTP/1.1: exactly one valid Host
            return await self._deny(respond, scope, Reason.BAD_HOST, None)
        peer = scope["client"][0] if scope.get("client") else None
        if self._routes.by_host and told_another_host(self._headers.forwarded_hosts(scope["headers"], peer), name):
            return await self._deny(respond, scope, Reason.BAD_HOST, None)  # routed on one, told another
        try:
            route = self._routes.resolve(name if self._routes.by_host else None, decoded)
        except BadPath:
            return await self._deny(respond, scope, Reason.BAD_PATH, None)
        if route is None:
            return await self._deny(respond, scope, Reason.NO_ROUTE, None)
        if "GET" not in route.methods:  # a handshake is a GET: routes[].methods holds for it as for any request
            return await self._deny(respond, scope, Reason.METHOD_NOT_ALLOWED, route, extra=[(b"allow", route.allow)])
        slot = self._sockets.reserve(self._limits.max_connections)  # before any await: no overshoot
        if slot is None:
            return await self._deny(respond, scope, Reason.WEBSOCKET_LIMIT, route)
        try:
            admitted = await self._admission.websocket(scope, route)
            if admitted.refused is not None:
                return await self._deny(respond, scope, admitted.refused, route, admitted.set_cookies)
            return await self._tunnel(scope, receive, send, respond, info, route, path, host, admitted, slot)
        finally:
            self._sockets.release(slot)

    async def _tunnel(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        respond: Send,
        info: RequestInfo,
        route: Route,
        path: str,
        host: bytes | None,
        admitted: Admitted,
        slot: Slot,
    ) -> Ending:
        claims = admitted.claims
        watch: tuple[str, ...] = ()
        if claims is not None:
            info.subject, info.refreshed = claims.get("sub"), admitted.refreshed
            # What ends this socket: the end of its session (found from the verified access
            # token, see gateway.families), or a logout with the token itself.
            watch = await self._families.watch_keys(claims)
        connecting = time.perf_counter()
        upstream = await self._connect(scope, respond, info, route, path, host, admitted)
        if isinstance(upstream, tuple):
            return upstream  # refused
        info.answered = time.perf_counter()
        info.upstream = info.answered - connecting
        cookies = admitted.set_cookies or []
        accept = [(b"set-cookie", c) for c in cookies]
        accept.append((b"x-request-id", info.request_id.encode()))
        exp = claims.get("exp") if claims is not None and self._limits.close_on_expiry else None
        tunnel = Tunnel(watch, float(exp) if isinstance(exp, int | float) else None)
        self._sockets.add(tunnel, slot)
        by = "error"
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": accept})
            by = await relay(tunnel, receive, send, upstream, self._limits.max_message_size)
        finally:
            self._sockets.discard(tunnel, by)
            await upstream.close()
        return route.name, 101, by

    async def _connect(
        self,
        scope: Scope,
        respond: Send,
        info: RequestInfo,
        route: Route,
        path: str,
        host: bytes | None,
        admitted: Admitted,
    ) -> UpstreamSocket | Ending:
        """The upstream's socket, or the answer already sent in its place (its refusal, 502, 504)."""
        try:
            headers = self._headers.upstream(
                scope,
                host=host,
                identity=admitted.identity,
                info=info,
                token=admitted.token if admitted.claims is not None else None,
                authorization=route.auth == "none" or (admitted.bearer and admitted.claims is not None),
                scheme="https" if scope.get("scheme") == "wss" else "http",
            )
        except BadHeader:
            return await self._deny(respond, scope, Reason.BAD_HEADER, route, admitted.set_cookies)
        # The client library makes its own Sec-WebSocket-* headers; Host is the client's, as on
        # the HTTP path (tunnel.open_upstream puts it in place of the library's).
        headers = [(n, v) for n, v in headers if not n.startswith("sec-websocket-")]
        if self._assertion is not None and admitted.claims is not None:
            headers.append(self._assertion.header(admitted.token, admitted.claims, route))
        up = route.upstream
        query: bytes = scope["query_string"]
        url = f"{'wss' if up.scheme == 'https' else 'ws'}://{up.netloc}{up.base_path}{path}"
        if query:
            url += f"?{query.decode('latin-1')}"
        limits = self._limits
        cookies = admitted.set_cookies
        try:
            return await open_upstream(
                url, headers, scope.get("subprotocols"), route.connect_timeout, limits, route.tls
            )
        except InvalidStatus as exc:
            # The upstream refused the handshake: its answer goes back as it was.
            answer = exc.response
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.raw_items()]
            out = [(n, v) for n, v in self._headers.outbound(raw, route.name) if n not in _FRAMING]
            body = answer.body or b""
            out += [(b"content-length", str(len(body)).encode()), (b"x-request-id", info.request_id.encode())]
            out += [(b"set-cookie", c) for c in cookies or []]
            await respond({"type": "http.response.start", "status": answer.status_code, "headers": out})
            await respond({"type": "http.response.body", "body": body})
            return route.name, answer.status_code, None
        except TimeoutError:
            log.warning("route %s: upstream WebSocket handshake timed out", route.name)
            return await self._deny(respond, scope, Reason.UPSTREAM_TIMEOUT, route, cookies)
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            tls = tls_failure(f"{up.scheme}://{up.netloc}", exc)
            log.warning("route %s: upstream WebSocket refused: %s", route.name, tls or type(exc).__name__)
            return await self._deny(respond, scope, Reason.UPSTREAM_UNREACHABLE, route, cookies)


def _refuse_handshake(send: Send) -> Send:
    """Without the denial-response extension, any refusal is a close before accept (HTTP 403)."""

    async def refuse(message: Message) -> None:
        if message["type"] == "http.response.start":
            await send({"type": "websocket.close", "code": 1008})

    return refuse
