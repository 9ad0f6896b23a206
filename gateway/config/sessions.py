"""``cookies``, ``login``, ``logout`` and ``csrf``: browser sessions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.base import HEADER_NAME, Model, is_http_url
from gateway.config.tls import TLSConfig


class CookieSpec(Model):
    """One of the gateway's cookies. Both are `HttpOnly; Path=/`."""

    name: str
    """Cookie name; with `cookies.secure` it gets the `__Host-` prefix (`__Host-gw_access`)."""
    max_age: int | None = Field(None, ge=0)
    """`Max-Age` in seconds; none makes a session cookie. For the refresh cookie it caps the time left until the
    refresh token's `exp` (a refresh token that is not a JWT gets it, or 14 days when it is none)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError("not a valid cookie name")
        return value


class RefreshCookieSpec(CookieSpec):
    """The refresh-token cookie."""

    sealed: bool = True
    """The cookie holds the refresh token sealed by the gateway (AES-SIV under a key derived from `store.secret`,
    bound to the cookie's name): the browser never holds the token in plain text, and a cookie the gateway did not
    issue is refused (401) without calling the IdP or writing to the store. `false` accepts a raw refresh token
    (for apps that set the cookie themselves); the gateway then limits, per client address and worker, how many
    refreshes with tokens it never saw before may start (a burst of 10, then one every 5 seconds; beyond: 429
    `refresh_rate_limited`). Changing it logs every session out: cookies of one kind do not read as the other."""


class CookiesConfig(Model):
    """The session cookies. A cookie sent twice, or one that cannot be parsed, counts as absent."""

    access: CookieSpec = CookieSpec(name="gw_access")
    """The access-token cookie (a session cookie unless `max_age` is set)."""
    refresh: RefreshCookieSpec = RefreshCookieSpec(name="gw_refresh", max_age=1209600)
    """The refresh-token cookie (14 days), sealed by default."""
    secure: bool = True
    """Adds `Secure` and the `__Host-` prefix to both names. Turn it off only for plain-HTTP development."""
    same_site: Literal["lax", "strict", "none"] = "lax"
    """The cookies' `SameSite` attribute."""
    max_total: int = Field(12288, ge=1024, le=1_048_576)
    """Bytes of both cookies' values together (the access token, and the refresh token as sealed) that the gateway
    sets. A cookie over the browsers' 4096 bytes is split into numbered cookies (`__Host-gw_access_0`, `_1`...);
    tokens past this total are refused at login, capture and refresh (502 `cookie_too_large`, logged with their
    size): use `session: {mode: server}` for them. Every request carries the cookies, so the `Cookie` header must
    fit the limits of every server on the way: `server.limits.header_bytes` here (a total set here must leave 4096
    bytes of it for the rest of the head), nginx's `large_client_header_buffers` (8 KB per header line by default)
    in front."""

    @model_validator(mode="after")
    def _names(self) -> CookiesConfig:
        access, refresh = self.access.name, self.refresh.name
        if access == refresh or _chunk_of(access, refresh) or _chunk_of(refresh, access):
            raise ValueError("access.name and refresh.name must differ, and neither be the other's `<name>_N` chunk")
        return self


def _chunk_of(name: str, stem: str) -> bool:
    """``name`` is ``<stem>_N``, the name of one of ``stem``'s chunks."""
    return name.startswith(stem + "_") and name[len(stem) + 1 :].isdigit()


class OIDCConfig(Model):
    """The OIDC authorization-code login with PKCE, run by the gateway itself. The ID token is checked with the
    keys from `tokens` (so the IdP's keys must be configured there, usually `jwks_url`)."""

    issuer: str
    """The IdP's issuer (http(s)); its discovery document is `{issuer}/.well-known/openid-configuration`, whose
    `issuer` must equal this exactly."""
    client_id: str
    """OAuth client id; also the ID token's expected `aud`."""
    client_secret: str | None = None
    """OAuth client secret for the code exchange (use `${VAR}`); none for a public client."""
    scopes: tuple[str, ...] = ("openid", "offline_access")
    """Scopes asked for; must include `openid`. Without `offline_access` (no refresh token) only the access cookie
    is set."""
    redirect_url: str
    """The callback URL registered at the IdP (http(s)), normally `https://your.host{prefix}/callback`."""
    post_logout_redirect_url: str | None = None
    """Where the IdP sends the browser after RP-initiated logout (`post_logout_redirect_uri`, registered at the
    IdP). Default: `logout.redirect`, made absolute against the origin of `redirect_url`. Used only when the
    discovery document advertises an `end_session_endpoint`."""
    tls: TLSConfig | None = None
    """TLS to the `https://` IdP: its discovery document and token endpoint (its keys come with `tokens.tls`)."""

    @field_validator("issuer", "redirect_url", "post_logout_redirect_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError('must include "openid"')
        return value


class LoginConfig(Model):
    """Where browsers without a session go: an external login page, or the gateway's own OIDC login."""

    url: str | None = None
    """Browsers without a session are redirected here; `{next}` is replaced by the URL-encoded relative path and
    query of the original request. Ignored when `oidc` is set."""
    oidc: OIDCConfig | None = None
    """The gateway runs the OIDC code + PKCE login itself; the login URL becomes `{prefix}/login?next={next}`."""


class LogoutConfig(Model):
    """What `POST {prefix}/logout` does for a browser once the session has ended."""

    redirect: str = "/"
    """Where browsers land (303) after logout. A relative value must pass the safe-`next` check (else `/`); an
    absolute URL is used as written. With `login.oidc` and an IdP that advertises an `end_session_endpoint`,
    browsers go there first (RP-initiated logout) and the IdP sends them on to
    `login.oidc.post_logout_redirect_url` (by default this, made absolute)."""


class CSRFConfig(Model):
    """Cross-site request forgery: cookie-authenticated unsafe requests must come from an allowed origin."""

    allowed_origins: tuple[str, ...] = ()
    """Origins (`scheme://host[:port]`, compared after normalisation) accepted for cookie-authenticated unsafe
    requests besides the request's own."""


class SessionCookieSpec(Model):
    """The one cookie a browser holds in `session.mode: server`: `HttpOnly; Path=/`, `Secure` and `SameSite` as
    `cookies.secure` and `cookies.same_site` say."""

    name: str = "gw_session"
    """Cookie name; with `cookies.secure` it gets the `__Host-` prefix (`__Host-gw_session`). It holds a random
    32-byte session id sealed by the gateway (AES-SIV, bound to the name), never a token."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError("not a valid cookie name")
        return value


class SessionConfig(Model):
    """Where a browser's tokens live: in its cookies (`cookie`), or in the store behind one session cookie
    (`server`, the backend-for-frontend shape; docs/browser-sessions.md)."""

    mode: Literal["cookie", "server"] = "cookie"
    """`cookie`: the access and refresh tokens ride in the gateway's cookies (`cookies`). `server`: after a login
    (OIDC or a capture route) the tokens are kept sealed in the store and the browser holds only `session.cookie`;
    no token is ever set in a cookie. Needs `store.secret` with a shared store, and a shared store (redis) to run
    several workers. Changing it logs every browser session out."""
    cookie: SessionCookieSpec = SessionCookieSpec()
    """The session cookie of `mode: server`."""
    idle_timeout: int = Field(28_800, ge=1)
    """`mode: server`: a session not used for this many seconds ends (8 hours). Use is recorded at most once a
    minute (an eighth of the timeout when that is shorter), so a session may end up to that much earlier."""
    absolute_timeout: int = Field(1_209_600, ge=1)
    """`mode: server`: a session ends this many seconds after its login, however much it is used (14 days). The
    session cookie gets it as `Max-Age`."""
