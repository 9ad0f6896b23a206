"""``tls``: how the gateway checks the https servers it calls (upstreams, the IdP) and proves itself to them.

The same model sits under ``routes[]``, ``refresh``, ``tokens`` and ``login.oidc``. Loading reads no file:
the files are read, and their PEM checked, by ``checks.validate_files`` (``gateway check``, start, reload).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import model_validator

from gateway.config.base import Model, key_problems

_HOST_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")


class TLSConfig(Model):
    """TLS to an https server the gateway calls: a private CA, a client certificate (mutual TLS), the name its
    certificate is checked against (and sent as SNI). Without `tls`, https is verified against the system's CAs.
    A TLS failure to an upstream is 502 `upstream_unreachable` with a log line that says what TLS refused."""

    ca_file: str | None = None
    """PEM file of the CA certificate(s) to trust instead of the system's (a private CA). Read by `gateway check`
    and at start."""
    cert_file: str | None = None
    """PEM client certificate (chain) the gateway presents: mutual TLS. Its private key is in `key_file`, or in
    this file when `key_file` is not set."""
    key_file: str | None = None
    """PEM private key of `cert_file` (unencrypted); needs `cert_file`."""
    server_name: str | None = None
    """Host name sent as SNI and that the server's certificate must be valid for, instead of the URL's host (for
    an upstream addressed by IP, or through a name its certificate does not carry)."""
    verify: bool = True
    """`false` accepts any certificate: the server is not authenticated and anyone on the path can read and change
    the traffic. Allowed for tests, with a loud warning at start and on each reload; cannot be combined with
    `ca_file`."""

    @model_validator(mode="after")
    def _consistent(self) -> TLSConfig:
        problems: list[tuple[str, str]] = []
        if self.key_file is not None and self.cert_file is None:
            problems.append(("key_file", "needs cert_file (the certificate this key belongs to)"))
        if not self.verify and self.ca_file is not None:
            problems.append(("ca_file", "has no effect with verify: false; remove one of them"))
        if self.server_name is not None and not _HOST_NAME.match(self.server_name):
            problems.append(("server_name", f"{self.server_name!r} is not a host name (no scheme, port or path)"))
        if problems:
            raise key_problems(*problems)
        return self


def http_only(tls: TLSConfig | None, **urls: str | None) -> list[tuple[str, str]]:
    """Problems of a ``tls`` set where a URL it would apply to is plain http (TLS settings would be ignored)."""
    if tls is None:
        return []
    return [
        ("tls", f"{name} is http://, where TLS settings do not apply; use https:// or remove tls")
        for name, url in urls.items()
        if url is not None and urlsplit(url).scheme == "http"
    ]
