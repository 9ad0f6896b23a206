"""The gateway's two cookies: reading them from requests and writing them on responses.

Both are HttpOnly, Path=/, SameSite from config, and Secure unless configured off; with Secure
and Path=/ their names carry the ``__Host-`` prefix, so no subdomain or plain-HTTP page can set
or shadow them (RFC 6265bis §4.1.3.2). A cookie that appears twice, or that cannot be parsed,
is treated as absent: it is never an error page.

The refresh cookie holds the refresh token sealed by the gateway (``cookies.refresh.sealed``, the
default; gateway.sealing): ``set_refresh`` seals, ``open_refresh`` unseals, and a value that does not
unseal (not issued by this gateway, issued under another secret or for another cookie name, or a
raw token from before sealing) reads as no refresh token at all, so it never reaches the IdP or
the store. Sealing makes the value longer (16 bytes, then base64).

Big tokens (issue 16; oauth2-proxy's scheme): a cookie whose ``Set-Cookie`` would pass the browser's
4096 bytes goes out as numbered cookies, ``<name>_0``, ``<name>_1``... (``__Host-gw_access_0``), each
under the limit, and ``read`` joins them again. ``expand`` does it, on the way out, for every
``Set-Cookie`` the ``set_*``/``clear_*`` functions made: it also clears the chunks and the plain
cookie the request carried that the new value does not use, so no stale part is ever joined. A
cookie that fits stays one cookie, named as ever. Chunks with a gap or a duplicate, or beside the
plain cookie, read as absent, like a cookie sent twice. Past ``cookies.max_total`` bytes of values
together, ``session`` refuses (``CookieTooLarge``): that is what ``session: {mode: server}`` is for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from gateway.config import CookiesConfig
from gateway.errors import CookieTooLarge
from gateway.sealing import Sealer
from gateway.types import RawHeaders

# RFC 6265 §6.1: browsers keep at least 4096 bytes per cookie; many keep no more (Chromium counts
# name and value; the whole Set-Cookie line is kept under it here, to be safe everywhere).
MAX_COOKIE_BYTES = 4096
Headers = Iterable[tuple[bytes, bytes]]  # a request's raw headers, or none
DEFAULT_REFRESH_LIFETIME = 14 * 24 * 3600
DEFAULT_MAX_TOTAL = 12288
MAX_CHUNKS = 100  # <name>_0 .. <name>_99: far beyond any cookies.max_total a Cookie header can carry


@dataclass(frozen=True, slots=True)
class CookieJar:
    """Names and attributes of the gateway's cookies, fixed at start."""

    access_name: str
    refresh_name: str
    refresh_max_age: int | None
    access_max_age: int | None
    attributes: str
    sealer: Sealer | None = None  # seals the refresh cookie; None: cookies.refresh.sealed is off
    max_total: int = DEFAULT_MAX_TOTAL  # bytes of both cookies' values together (cookies.max_total)

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
            max_total=config.max_total,
        )

    @property
    def sealed(self) -> bool:
        return self.sealer is not None

    @property
    def bare_names(self) -> tuple[str, str]:
        return self.access_name.removeprefix("__Host-"), self.refresh_name.removeprefix("__Host-")

    def read(self, headers: RawHeaders) -> tuple[str | None, str | None]:
        """(access, refresh) cookie values, chunks joined; None for absent, duplicated, empty or broken ones."""
        access = refresh = None
        seen_access = seen_refresh = 0
        access_b, refresh_b = self.access_name.encode(), self.refresh_name.encode()
        chunk_stems = (access_b + b"_", refresh_b + b"_")
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
                elif key.startswith(chunk_stems):  # a big cookie's chunks: the slow way, rarely taken
                    found = _found(headers, (access_b, refresh_b))
                    return self._value(found, access_b), self._value(found, refresh_b)
        return _single(access, seen_access), _single(refresh, seen_refresh)

    def chunked(self, headers: RawHeaders) -> bool:
        """Whether the request carries any chunk of a big access or refresh cookie (``<name>_N``)."""
        stems = (self.access_name.encode() + b"_", self.refresh_name.encode() + b"_")
        return any(
            part.strip().partition(b"=")[0].startswith(stems)
            for name, value in headers
            if name == b"cookie"
            for part in value.split(b";")
        )

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
        """Set-Cookie values for new tokens (whole: ``expand`` splits them); raises CookieTooLarge past
        ``max_total`` rather than set cookies that a browser or a server on the way drops."""
        cookies = [self.set_access(access)]
        if refresh is not None:
            cookies.append(self.set_refresh(refresh, refresh_max_age))
        total = sum(len(_value_of(cookie)) for cookie in cookies)
        if total > self.max_total:
            raise CookieTooLarge(
                f"tokens of {total} bytes do not fit in cookies (cookies.max_total: {self.max_total}); "
                "use session: {mode: server}"
            )
        return cookies

    def expand(self, set_cookies: Iterable[bytes], request: Headers) -> list[bytes]:
        """``set_cookies`` as the browser must get them: one over the limit split into ``<name>_N`` chunks,
        and the chunks (or the plain cookie) ``request`` carried that the new value does not use, cleared."""
        stems = (self.access_name.encode(), self.refresh_name.encode())
        carried: list[tuple[bytes, bytes]] | None = None
        out: list[bytes] = []
        for cookie in set_cookies:
            name = cookie.partition(b"=")[0]
            if name not in stems:
                out.append(cookie)
                continue
            written = _split(cookie)
            if carried is None:
                carried = _found(request, stems)
            stale = {key for key, _ in carried if key == name or _chunk_index(key, name) is not None}
            stale -= {part.partition(b"=")[0] for part in written}
            out += written
            out += [self._cookie(key.decode("latin-1"), "", 0) for key in sorted(stale)]
        return out

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

    def _value(self, found: list[tuple[bytes, bytes]], stem: bytes) -> str | None:
        """The value of the cookie ``stem``: sent once whole, or as chunks 0..n-1 once each (and not both)."""
        plain, count = None, 0
        chunks: dict[int, bytes] = {}
        for key, value in found:
            if key == stem:
                plain, count = value, count + 1
                continue
            index = _chunk_index(key, stem)
            if index is None:
                continue
            if index in chunks or index >= MAX_CHUNKS:
                return None
            chunks[index] = value
        if not chunks:
            return _single(plain, count)
        if count or len(chunks) != max(chunks) + 1:
            return None
        parts = [_single(chunks[index], 1) for index in range(len(chunks))]
        if any(part is None for part in parts):
            return None
        joined = "".join(part for part in parts if part is not None)
        return joined if len(joined) <= self.max_total else None


def _found(headers: Headers, stems: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """(name, value) of every cookie in ``headers`` whose name starts with one of ``stems``."""
    found = []
    for name, value in headers:
        if name != b"cookie":
            continue
        for part in value.split(b";"):
            key, sep, val = part.strip().partition(b"=")
            if sep and key.startswith(stems):
                found.append((key, val))
    return found


def _chunk_index(key: bytes, stem: bytes) -> int | None:
    """N when ``key`` is ``<stem>_N`` (any digits: ``_00`` is chunk 0, so a duplicate of ``_0``)."""
    if len(key) <= len(stem) + 1 or not key.startswith(stem) or key[len(stem)] != 0x5F:  # "_"
        return None
    digits = key[len(stem) + 1 :]
    if not digits.isdigit():
        return None
    return int(digits) if len(digits) <= 3 else MAX_CHUNKS  # past any the gateway writes


def _value_of(cookie: bytes) -> bytes:
    return cookie.split(b";", 1)[0].partition(b"=")[2]


def _split(cookie: bytes) -> list[bytes]:
    """One Set-Cookie, or its value cut into ``<name>_N`` chunks each of whose Set-Cookie fits ``MAX_COOKIE_BYTES``."""
    if len(cookie) < MAX_COOKIE_BYTES:
        return [cookie]
    head, sep, attributes = cookie.partition(b";")
    name, _, value = head.partition(b"=")
    room = MAX_COOKIE_BYTES - 1 - len(name) - len(b"_99=") - len(sep + attributes)
    return [
        b"%s_%d=%s%s%s" % (name, number, value[start : start + room], sep, attributes)
        for number, start in enumerate(range(0, len(value), room))
    ]


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
