"""Header rules for both directions, compiled once: strip, then inject.

Inbound (client -> upstream): hop-by-hop headers and every header named in ``Connection`` go; every header matching
``identity.strip_inbound`` or naming an identity header goes, however it is spelled (case, ``_`` or ``.`` for ``-``,
duplicates, an ``HTTP-`` prefix), and so does X-Request-ID spelled otherwise; the gateway's own cookies (and the
numbered chunks of a big one, ``gw_access_0``...) are cut out of ``Cookie``; every proxy header (``PROXY_HEADERS``:
X-Forwarded-*, X-Original-URL, True-Client-IP, X-HTTP-Method-Override...) goes; ``X-Forwarded-For/-Proto/-Host`` are
set from the connection, and incoming ones are believed only from ``server.trusted_proxies``. Identity headers are
injected after all of that, so nothing a client sends can stand in for them.

Outbound (upstream -> client): hop-by-hop headers go, and an upstream ``Set-Cookie`` for one of
the gateway's cookie names (or a chunk's) is dropped (an app must not overwrite the session).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import re
from collections.abc import Iterable

from gateway.accesslog import RequestInfo
from gateway.cache import BoundedCache
from gateway.errors import BadHeader
from gateway.types import RawHeaders, Scope, StrHeaders

log = logging.getLogger("gateway.headers")


HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te"}
    | {b"trailer", b"transfer-encoding", b"upgrade"}
)
_NONE: frozenset[bytes] = frozenset()
# Named in Connection, these still go: the upstream reads the request the gateway routed (its Host) and logged (its
# X-Request-ID). "Connection: Host" sent the upstream its own address as Host, another virtual host than the routed one.
_END_TO_END = frozenset({b"host", b"x-request-id"})
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})  # they list no header
# What proxies tell the app about the original request. From a client they are lies an app may act
# on (IIS URL Rewrite and old Symfony take the path from X-Original-URL / X-Rewrite-URL; frameworks
# the method from X-HTTP-Method-Override, the client's address from True-Client-IP...): all go, from
# everyone. The gateway sets X-Forwarded-For/-Proto/-Host itself, believing only trusted proxies'.
# identity.strip_inbound adds more.
PROXY_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x-forwarded-server",
        b"x-forwarded-uri",
        b"x-forwarded-path",
        b"x-forwarded-protocol",
        b"x-forwarded-client-cert",
        b"x-original-url",
        b"x-original-uri",
        b"x-rewrite-url",
        b"x-original-host",
        b"x-original-forwarded-for",
        b"x-original-method",
        b"x-host",
        b"x-real-ip",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-envoy-external-address",
        b"x-envoy-original-path",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"front-end-https",
        b"x-url-scheme",
        b"x-scheme",
        b"x-proxyuser-ip",
    }
)


def _canonical(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-").replace(b".", b"-")


def _connection_listed(headers: RawHeaders) -> set[bytes]:
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":  # upstream raw headers keep their original case
            listed.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return listed - _END_TO_END


class TrustedProxies:
    """``address in trusted``: the answer remembered per address (a few peers ask again and again)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._known: BoundedCache[str, bool] = BoundedCache(4096)

    def __contains__(self, address: str | None) -> bool:
        if not self._networks or not address:
            return False
        known = self._known.get(address)
        if known is None:
            known = self._known.put(address, self._check(address))
        return known

    def _check(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)


class HeaderRules:
    """The compiled strip/inject rules for requests and responses."""

    def __init__(
        self,
        *,
        strip_patterns: Iterable[str],
        identity_names: Iterable[bytes],
        cookie_names: Iterable[str],
        trusted_proxies: Iterable[str],
        forward_token: bool = False,
        app_cookies: Iterable[str] = (),
    ) -> None:
        patterns = [fnmatch.translate(p.lower().replace("_", "-").replace(".", "-")) for p in strip_patterns]
        self._strip = re.compile("|".join(patterns).encode()) if patterns else None
        self._identity = frozenset(_canonical(n) for n in identity_names)
        self._cookies = frozenset(c.encode() for c in cookie_names)
        self._app_sets = frozenset(c.encode() for c in app_cookies)  # gateway cookies an upstream may set
        self._trusted = TrustedProxies(trusted_proxies)
        self._forward_token = forward_token  # identity.forward_token: the verified token goes upstream
        self._plain: BoundedCache[bytes, bool] = BoundedCache(4096)  # name -> passes inbound filter (memo)
        self._lowered: BoundedCache[bytes, bytes] = BoundedCache(4096)  # upstream name -> lower case (memo)

    def _passes(self, name: bytes) -> bool:
        known = self._plain.get(name)
        if known is not None:
            return known
        canon = _canonical(name)
        ok = canon not in HOP_BY_HOP and canon not in PROXY_HEADERS and not self._identity_named(canon)
        ok = ok and (canon != b"x-request-id" or name.lower() == canon)  # X_Request_ID: X-Request-ID to Django (ASGI)
        while ok and canon.startswith(b"http-"):
            # Django 5.2 under ASGI reads RemoteUserMiddleware's header = "HTTP_X_AUTH_USER" from
            # the header HTTP-X-Auth-User (tickets #36300, #37079): such a name is an identity header too.
            canon = canon[5:]
            ok = not self._identity_named(canon)
        return self._plain.put(name, ok)

    def _identity_named(self, canon: bytes) -> bool:
        return canon in self._identity or (self._strip is not None and self._strip.fullmatch(canon) is not None)

    def inbound(
        self, headers: RawHeaders, *, client: str | None, scheme: str, host: bytes | None, connection: bool = True
    ) -> StrHeaders:
        """Headers to send upstream, before identity headers are added; decoded for the client.

        Values are decoded as UTF-8, which the clients (aiohttp, websockets) encode them back to:
        the upstream gets the client's bytes unchanged. A value that is not UTF-8 could not
        survive that (latin-1 came out double-encoded): it raises ``BadHeader``, answered 400.
        ``connection=False`` says there is no Connection header (the caller looked already).
        """
        listed = _connection_listed(headers) if connection and any(n == b"connection" for n, _ in headers) else _NONE
        out: StrHeaders = []
        forwarded_for: list[bytes] = []
        forwarded_proto = forwarded_host = None
        trusted = client in self._trusted
        for name, value in headers:
            if name in listed:
                continue
            if trusted and name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif name == b"x-forwarded-proto":
                    forwarded_proto = value
                else:
                    forwarded_host = value
                continue
            if not self._passes(name):
                continue
            if name == b"cookie":
                value = self._without_gateway_cookies(value)
                if not value:
                    continue
            try:
                out.append((name.decode("ascii"), value.decode("utf-8")))
            except UnicodeDecodeError:
                raise BadHeader(name.decode("ascii", "replace")) from None
        if client:
            forwarded_for.append(client.encode())
        try:
            out.append(("x-forwarded-for", b", ".join(forwarded_for).decode("utf-8")))
            out.append(("x-forwarded-proto", (forwarded_proto or scheme.encode()).decode("utf-8")))
            if forwarded_host or host:
                out.append(("x-forwarded-host", (forwarded_host or host or b"").decode("utf-8")))
        except UnicodeDecodeError:
            raise BadHeader("x-forwarded-*") from None
        return out

    def upstream(
        self,
        scope: Scope,
        *,
        host: bytes | None,
        identity: StrHeaders,
        info: RequestInfo,
        token: str | None,
        authorization: bool = True,
        scheme: str | None = None,
        connection: bool = True,
        client_request_id: bool = True,
    ) -> StrHeaders:
        """The request's headers as the upstream gets them: filtered, then identity and request ID added.

        ``token`` is the verified access token (None without one); it goes upstream with
        identity.forward_token. ``authorization`` False drops the client's own Authorization.
        ``connection`` / ``client_request_id`` False say the request has no Connection /
        X-Request-ID header, which saves looking (the HTTP path knows already).
        """
        client = scope.get("client")
        out = self.inbound(
            scope["headers"],
            client=client[0] if client else None,
            scheme=scheme or scope.get("scheme", "http"),
            host=host,
            connection=connection,
        )
        if not authorization:
            out = [(n, v) for n, v in out if n != "authorization"]
        out.extend(identity)
        # The client's goes on only as the ID the gateway logs: not a second one, nor an insane one.
        if client_request_id:
            out = [(n, v) for n, v in out if n != "x-request-id"]
        out.append(("x-request-id", info.request_id))
        if self._forward_token and token:
            out = [(n, v) for n, v in out if n != "authorization"]
            out.append(("authorization", "Bearer " + token))
        return out

    def origin(self, headers: RawHeaders, client: str | None, scheme: str) -> str:
        """``scheme://host`` the browser used: X-Forwarded-Proto/Host only from trusted proxies."""
        host = proto = None
        trusted = client in self._trusted
        for name, value in headers:
            if name == b"host" and host is None:
                host = value
            elif trusted and name == b"x-forwarded-host":
                host = value.split(b",")[0].strip()
            elif trusted and name == b"x-forwarded-proto":
                proto = value.split(b",")[0].strip()
        if trusted:
            for name, value in headers:
                if name == b"x-forwarded-host":
                    host = value.split(b",")[0].strip()
        return f"{(proto or scheme.encode()).decode('latin-1')}://{(host or b'').decode('latin-1')}"

    def forwarded_hosts(self, headers: RawHeaders, peer: str | None) -> list[bytes]:
        """Every host a trusted proxy's X-Forwarded-Host names (a peer not trusted names none)."""
        if peer not in self._trusted:
            return []
        return [part for n, v in headers if n == b"x-forwarded-host" for part in v.split(b",")]

    def client(self, headers: RawHeaders, peer: str | None) -> str | None:
        """The client's address: the peer, or behind trusted proxies the last X-Forwarded-For hop none of them is."""
        if peer not in self._trusted:
            return peer
        hops = [hop.strip().decode("latin-1") for n, v in headers if n == b"x-forwarded-for" for hop in v.split(b",")]
        for hop in reversed(hops):
            if hop and hop not in self._trusted:
                return hop
        return hops[0] if hops and hops[0] else peer

    def _without_gateway_cookies(self, value: bytes) -> bytes:
        kept = []
        for part in value.split(b";"):
            name = part.split(b"=", 1)[0].strip()
            if _stem(name.removeprefix(b"__Host-")) not in self._cookies:
                kept.append(part.strip())
        return b"; ".join(kept)

    def outbound(self, headers: Iterable[tuple[bytes, bytes]], route: str) -> RawHeaders:
        """Response headers for the client: names lower-cased, hop-by-hop and Connection-listed ones dropped."""
        out: RawHeaders = []
        listed: set[bytes] = set()
        lowered = self._lowered
        for name, value in headers:
            lower = lowered.get(name)
            if lower is None:
                lower = lowered.put(name, name.lower())
            if lower in HOP_BY_HOP:
                if lower == b"connection" and value not in _PLAIN_CONNECTION:
                    listed.update(part.strip().lower() for part in value.split(b","))
                continue
            if lower == b"set-cookie":
                cookie = value.split(b";", 1)[0].split(b"=", 1)[0].strip(b" \t")
                # A nameless cookie ("=gw_access=x") comes back from the browser as "gw_access=x".
                bare = cookie.removeprefix(b"__Host-")
                if not cookie or (_stem(bare) in self._cookies and bare not in self._app_sets):
                    log.warning("route %s: dropped an upstream Set-Cookie for a gateway cookie or no name", route)
                    continue
            out.append((lower, value))
        listed -= HOP_BY_HOP  # Connection: keep-alive / close / upgrade name nothing more to drop
        if listed:
            out = [(n, v) for n, v in out if n not in listed]
        return out


def _stem(name: bytes) -> bytes:
    """The cookie a name belongs to: ``gw_access_1`` (a chunk of a big cookie, gateway.cookies) is ``gw_access``."""
    stem, sep, number = name.rpartition(b"_")
    return stem if sep and number.isdigit() else name
