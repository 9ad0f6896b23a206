"""Cross-site request forgery defence for cookie-authenticated unsafe requests.

Cookies ride along on requests another site makes the browser send, so an unsafe method (any but
GET, HEAD and OPTIONS) authenticated by the gateway's cookie must come from the page's own origin:
refused when ``Sec-Fetch-Site: cross-site``, or when ``Origin`` (else ``Referer``) names another
origin that ``csrf.allowed_origins`` does not list. Requests with neither header (old clients,
curl) pass: browsers that can be tricked send at least one of them on cross-site POSTs. Bearer
requests are exempt: a browser never adds an ``Authorization`` header on its own. On a route whose
``cors`` allows credentials, an ``Origin`` it allows passes, even cross-site: the route's owner
trusts that origin with the session (gateway.cors).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from gateway.types import RawHeaders

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # every other method may change state (WebDAV, PURGE, QUERY...)


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL, lower-cased, default ports dropped; None if it has none."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


class CSRFGuard:
    def __init__(self, allowed_origins: Iterable[str]) -> None:
        self._allowed = frozenset(o for o in (origin_of(a) for a in allowed_origins) if o)

    def refuses(self, method: str, headers: RawHeaders, own_origin: str, trusted: frozenset[str] = frozenset()) -> bool:
        """True when this unsafe, cookie-authenticated request must be refused.

        ``trusted``: origins the route's ``cors`` lets send credentialed requests; a request whose ``Origin`` is one
        of them passes, even cross-site (a browser never lets a page forge ``Origin``).
        """
        if method in SAFE_METHODS:
            return False
        origin = referer = None
        cross_site = False
        for name, value in headers:
            if name == b"sec-fetch-site" and value.strip().lower() == b"cross-site":
                cross_site = True
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"referer":
                referer = value.decode("latin-1")
        if trusted and origin is not None and origin_of(origin) in trusted:
            return False
        if cross_site:
            return True
        claimed = origin if origin is not None else referer
        if claimed is None:
            return False
        if claimed.strip() == "null":  # sandboxed frames, file: pages, some redirects
            return True
        found = origin_of(claimed)
        expected = origin_of(own_origin)
        return found is None or (found != expected and found not in self._allowed)
