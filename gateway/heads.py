"""Request heads: what the HTTP path needs from a request's headers, found in one pass over them.

The pass is on the hot path (every request, every header): it looks only at what every request needs.
Headers a few routes need (``Origin`` on a ``cors`` route) are looked for by those routes' own stages.
"""

from __future__ import annotations

from gateway.types import RawHeaders


class Scanned:
    """What the path needs from the request's headers, found in one pass over them."""

    __slots__ = (
        "host",
        "hosts",
        "authorization",
        "authorizations",
        "request_id",
        "has_body",
        "length",
        "cookies",
        "connection",
        "coded",
    )

    def __init__(self, headers: RawHeaders) -> None:
        self.host: bytes | None = None
        self.authorization: bytes | None = None  # the first one
        self.request_id: bytes | None = None
        self.length: bytes | None = None  # Content-Length
        self.hosts = self.authorizations = 0
        self.has_body = self.cookies = self.connection = False
        self.coded = False  # a transfer coding besides chunked (gzip, chunked): it would reach the upstream undone
        for name, value in headers:
            if name == b"host":
                self.host = value
                self.hosts += 1
            elif name == b"authorization":
                if self.authorization is None:
                    self.authorization = value
                self.authorizations += 1
            elif name == b"cookie":
                self.cookies = True
            elif name == b"content-length":
                self.has_body = value.strip() != b"0"
                self.length = value
            elif name == b"transfer-encoding":
                self.has_body = True
                self.coded = self.coded or value.strip().lower() != b"chunked"
            elif name == b"x-request-id" and self.request_id is None:
                self.request_id = value
            elif name == b"connection":
                self.connection = True
