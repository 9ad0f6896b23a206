"""The gateway's two cookies: reading them from requests and writing them on responses.

Both are HttpOnly, Path=/, SameSite from config, and Secure unless configured off; with Secure
and Path=/ their names carry the ``__Host-`` prefix, so no subdomain or plain-HTTP page can set
or shadow them (RFC 6265bis §4.1.3.2). A cookie that appears twice, or that cannot be parsed,
is treated as absent: it is never an error page.

The refresh cookie holds the refresh token sealed by the gateway (``cookies.refresh.sealed``, the
default; gateway.sealing): ``set_refresh`` seals, ``open_refresh`` unseals, and a value that does not
unseal (not issued by this gateway, issued under another secret or for another cookie name, or a
raw token from before sealing) reads as no refresh token at all, so it never reaches the IdP or
the store. Sealing makes the value longer (16 bytes, then base64): the size check in ``session``
measures the cookie as sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt

from gateway.config import CookiesConfig
from gateway.errors import CookieTooLarge
from gateway.sealing import Sealer
from gateway.types import RawHeaders

# RFC 6265 §6.1: browsers keep at least 4096 bytes per cookie; many keep no more.
MAX_COOKIE_BYTES = 4096
DEFAULT_REFRESH_LIFETIME = 14 * 24 * 3600


@dataclass(frozen=True, slots=True)
class CookieJar:
    """Names and attributes of the gateway's cookies, fixed at start."""

    access_name: str
    refresh_name: str
    refresh_max_age: int | None
    access_max_age: int | None
    attributes: str
    sealer: Sealer | None = None  # seals the refresh cookie; None: cookies.refresh.sealed is off

    @classmethod
    def from_config(cls, config: CookiesConfig, sealer: Sealer) -> CookieJar:
        prefix = "__Host-" if config.secure else ""
        attrs = f"; Path=/; HttpOnly; SameSite={config.same_site.capitalize()}"
        if config.secure:
            attrs += "; Secure"
        return cls(
            access_name=prefix + config.access.name,
            refresh_name=prefix + config.refresh.name,
            access_max_age=config.access.max_age,
            refresh_max_age=config.refresh.max_age,
            attributes=attrs,
            sealer=sealer if config.refresh.sealed else None,
        )

    @property
    def sealed(self) -> bool:
        return self.sealer is not None

    @property
    def bare_names(self) -> tuple[str, str]:
        return self.access_name.removeprefix("__Host-"), self.refresh_name.removeprefix("__Host-")

    def read(self, headers: RawHeaders) -> tuple[str | None, str | None]:
        """(access, refresh) cookie values; None for absent, duplicated or empty ones."""
        access = refresh = None
        seen_access = seen_refresh = 0
        access_b, refresh_b = self.access_name.encode(), self.refresh_name.encode()
        for name, value in headers:
            if name != b"cookie":
                continue
            for part in value.split(b";"):
                key, sep, val = part.strip().partition(b"=")
                if not sep:
                    continue
                if key == access_b:
                    seen_access += 1
                    access = val
                elif key == refresh_b:
                    seen_refresh += 1
                    refresh = val
        return _single(access, seen_access), _single(refresh, seen_refresh)

    def set_access(self, token: str, max_age: int | None = None) -> bytes:
        age = max_age if max_age is not None else self.access_max_age
        return self._cookie(self.access_name, token, age)

    def set_refresh(self, token: str, max_age: int | None = None) -> bytes:
        """The refresh cookie holding ``token`` (sealed unless cookies.refresh.sealed is off)."""
        age = max_age if max_age is not None else self.refresh_max_age
        value = self.sealer.seal_cookie(token, self.refresh_name) if self.sealer is not None else token
        return self._cookie(self.refresh_name, value, age)

    def open_refresh(self, value: str) -> str | None:
        """The refresh token a refresh cookie's value (from ``read``) holds; None when it was not sealed here."""
        if self.sealer is None:
            return value
        return self.sealer.open_cookie(value, self.refresh_name)

    def clear_access(self) -> bytes:
        return self._cookie(self.access_name, "", 0)

    def clear_refresh(self) -> bytes:
        return self._cookie(self.refresh_name, "", 0)

    def session(self, access: str, refresh: str | None, refresh_max_age: int | None) -> list[bytes]:
        """Set-Cookie values for a new session; raises CookieTooLarge rather than set a cookie that vanishes."""
        cookies = [self.set_access(access)]
        if refresh is not None:
            cookies.append(self.set_refresh(refresh, refresh_max_age))
        for cookie in cookies:
            if len(cookie.split(b";", 1)[0]) > MAX_COOKIE_BYTES:
                raise CookieTooLarge(cookie.split(b"=", 1)[0].decode())
        return cookies

    def refresh_lifetime(self, token: str, now: float) -> int:
        """How long a refresh cookie holding ``token`` may live: its JWT exp, capped by config."""
        configured = self.refresh_max_age
        try:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
        except jwt.InvalidTokenError:
            exp = None  # opaque refresh tokens (Auth0, many OAuth2 servers)
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            remaining = max(int(exp - now), 1)
            return min(remaining, configured) if configured else remaining
        return configured or DEFAULT_REFRESH_LIFETIME

    def _cookie(self, name: str, value: str, max_age: int | None) -> bytes:
        age = f"; Max-Age={max_age}" if max_age is not None else ""
        return f"{name}={value}{age}{self.attributes}".encode("latin-1")


def _single(value: bytes | None, count: int) -> str | None:
    if count != 1 or not value:
        return None
    value = value.strip(b'"')
    if not value:  # a quoted empty value ("") is empty too
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None
