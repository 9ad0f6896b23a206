"""``tokens`` and ``refresh``: how access tokens are verified and how sessions are refreshed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.base import (
    ASYMMETRIC_ALGORITHMS,
    HS_ALGORITHMS,
    MAX_LEEWAY,
    MIN_HS_SECRET_BYTES,
    Model,
    is_http_url,
    key_problems,
)
from gateway.config.tls import TLSConfig


class _OpaqueEndpoint(Model):
    """What the two ways of checking an opaque token share: the endpoint is http(s), one call's time, its TLS."""

    endpoint: str
    timeout: float = Field(5, gt=0, le=60)
    """Seconds one call may take (then 503)."""
    tls: TLSConfig | None = None
    """TLS to an `https://` endpoint."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value


class IntrospectionConfig(_OpaqueEndpoint):
    """Opaque access tokens checked at an RFC 7662 introspection endpoint: `POST token=...,
    token_type_hint=access_token` with the gateway's client credentials. The answer's fields (`sub`, `username`,
    `scope`, `exp`, `client_id` and any others) are the token's claims for `required_claims`, `require` and the
    identity headers. `active: false` is an expired token (a cookie session refreshes; otherwise 401); an endpoint
    that is down, slow, refuses the gateway or answers something unreadable is 503 `introspection_unavailable`
    (cookies kept, never a logout)."""

    endpoint: str
    """The introspection endpoint (http(s))."""
    client_id: str
    """The gateway's client id at the endpoint."""
    client_secret: str | None = None
    """Its secret (use `${VAR}`)."""
    client_auth: Literal["basic", "post"] = "basic"
    """How the gateway authenticates: `basic` (RFC 6749 §2.3.1) or `post` (form fields)."""
    cache: float = Field(60, ge=0, le=3600)
    """Seconds an answer is reused, kept by a keyed hash of the token (never the token), and never past the
    token's `exp`. A token revoked at the IdP keeps working up to this long; 0 asks on every request that the
    fast path does not serve (see docs/configuration-guide.md)."""


class UserinfoConfig(_OpaqueEndpoint):
    """Opaque access tokens checked at the OIDC userinfo endpoint: `GET` with `Authorization: Bearer`. Its claims
    (`sub`, `email`, ...) are the token's; it tells no expiry, so an answer is reused for `cache` seconds. A 401 is
    an expired token (a cookie session refreshes; otherwise 401); an endpoint that is down or answers something
    unreadable is 503 `introspection_unavailable` (cookies kept)."""

    endpoint: str
    """The userinfo endpoint (http(s)); the `userinfo_endpoint` of the provider's discovery document."""
    cache: float = Field(60, ge=0, le=3600)
    """Seconds an answer is reused, kept by a keyed hash of the token. A token revoked at the IdP keeps working up
    to this long."""


class TokensConfig(Model):
    """How access tokens are verified. Set exactly one of `secret`, `public_key_file` or `jwks_url`, or, for opaque
    access tokens, one of `introspection` or `userinfo` (then every access token is checked there, and a key
    source, if set, only verifies `login.oidc`'s ID token). The `required_claims` must be present; a refresh token
    presented as an access token is refused, and so are tokens over 16 KiB."""

    algorithms: tuple[str, ...] = ("RS256",)
    """Allow-list from HS256/384/512, RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA. `none` is never
    accepted; `HS*` cannot be mixed with the others."""
    secret: str | None = None
    """`HS*` shared secret (use `${VAR}`); at least 32 bytes (48 for HS384, 64 for HS512, RFC 7518 §3.2)."""
    public_key_file: str | None = None
    """PEM public key for asymmetric algorithms; a private key is refused. Read by `gateway check` and at start."""
    jwks_url: str | None = None
    """http(s) JWKS, fetched at start and cached, then fetched again as `jwks_max_age` says. An unknown `kid`
    triggers a refetch, at most once per 5 s. When the endpoint is down the last good keys are kept, and a token
    with an unknown `kid` gets 503 `keys_unavailable` (cookies kept). RSA keys under 2048 bits and symmetric keys
    in the set are ignored, with a warning."""
    jwks_max_age: float = Field(600, ge=1, le=86400)
    """Longest time, in seconds, a fetched JWKS is used before it is fetched again. The JWKS answer's
    `Cache-Control: max-age`, when shorter, wins, but never below 60 s. A key the IdP removed stops being trusted
    after the next successful fetch; failed fetches keep the last good keys (and are retried within 60 s)."""
    issuer: str | None = None
    """When set, `iss` must match it exactly."""
    audience: str | None = None
    """When set, `aud` must contain it."""
    leeway: float = Field(30, ge=0)
    """Seconds of clock skew tolerated on `exp`, `nbf` and `iat`; at most 300."""
    refresh_before: float = Field(30, ge=0)
    """Refresh a cookie session when fewer seconds than this remain (at most half the token's own lifetime)."""
    required_claims: tuple[str, ...] = ("exp", "sub")
    """Top-level claims every access token must carry; one that is missing, null or empty is refused (401
    `missing_claim`). `exp` is always required (a token that never expires is never accepted); `sub` names the user
    in identity headers and logs. Add, e.g., `jti` or `email`."""
    revoke_superseded: bool = False
    """When a refresh replaces an access token, put the old one's `jti` on the denylist until its `exp` plus
    300 s (the most `leeway` may be), so a copy of it is refused (401 `token_revoked`). Needs `refresh.endpoint`
    and a `jti` claim."""
    tls: TLSConfig | None = None
    """TLS to an `https://` `jwks_url` (also used by `login.oidc` for the ID token's keys)."""
    introspection: IntrospectionConfig | None = None
    """Opaque access tokens, checked at an RFC 7662 introspection endpoint (cached)."""
    userinfo: UserinfoConfig | None = None
    """Opaque access tokens, checked at the OIDC userinfo endpoint (cached); an alternative to `introspection`."""

    @property
    def opaque(self) -> IntrospectionConfig | UserinfoConfig | None:
        """Where opaque access tokens are checked, if they are."""
        return self.introspection or self.userinfo

    @property
    def has_keys(self) -> bool:
        """Whether a key source (secret, key file, JWKS URL) is configured."""
        return bool(self.secret or self.public_key_file or self.jwks_url)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one algorithm")
        for alg in value:
            if alg.lower() == "none":
                raise ValueError('"none" is never accepted')
            if alg not in HS_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}")
        if set(value) & HS_ALGORITHMS and set(value) & ASYMMETRIC_ALGORITHMS:
            # One key would serve both kinds: the classic algorithm-confusion hole.
            raise ValueError("HS* algorithms cannot be mixed with asymmetric ones")
        return value

    @field_validator("required_claims")
    @classmethod
    def _required_claims(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "exp" not in value:
            raise ValueError("must include exp: a token that never expires is never accepted")
        if any(not name or name != name.strip() for name in value):
            raise ValueError("claim names must be non-empty, without surrounding spaces")
        return tuple(dict.fromkeys(value))

    @field_validator("leeway")
    @classmethod
    def _leeway(cls, value: float) -> float:
        if value > MAX_LEEWAY:
            raise ValueError(f"at most {MAX_LEEWAY} seconds")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks(cls, value: str | None) -> str | None:
        if value is not None and not is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _keys(self) -> TokensConfig:
        problems: list[tuple[str, str]] = []
        sources = [k for k in ("secret", "public_key_file", "jwks_url") if getattr(self, k)]
        symmetric = bool(set(self.algorithms) & HS_ALGORITHMS)
        if self.introspection is not None and self.userinfo is not None:
            problems.append(("userinfo", "set one of introspection and userinfo, not both"))
        # Opaque tokens need no key: login.oidc then finds the ID token's keys through discovery.
        if len(sources) > 1 or (not sources and self.opaque is None):
            what = "secret, public_key_file, jwks_url" + ("" if sources else " (or introspection or userinfo)")
            problems.append(("secret", f"set exactly one of {what}"))
        elif symmetric and sources != ["secret"]:
            problems.append((sources[0], "HS* algorithms need tokens.secret"))
        elif not symmetric and sources == ["secret"]:
            problems.append(("secret", "a shared secret only verifies HS* algorithms"))
        # RFC 7518 §3.2: the key is at least as long as the hash (32, 48, 64 bytes for HS256/384/512).
        minimum = max([MIN_HS_SECRET_BYTES] + [int(a[2:]) // 8 for a in self.algorithms if a in HS_ALGORITHMS])
        if symmetric and self.secret is not None and len(self.secret.encode()) < minimum:
            problems.append(("secret", f"HS secrets must be at least {minimum} bytes"))
        if problems:
            raise key_problems(*problems)
        return self


class RefreshFields(Model):
    """JSON field names of the `style: json` refresh call (Django SimpleJWT's by default)."""

    request: str = "refresh"
    """Field of the request body that carries the refresh token."""
    access: str = "access"
    """Field of the answer that carries the new access token."""
    refresh: str = "refresh"
    """Field of the answer that carries the new refresh token (absent: keep the current one)."""


class RefreshConfig(Model):
    """Transparent refresh: one IdP call per refresh token, whatever the number of requests, workers or faults
    (docs/refresh.md). Without `endpoint`, an expired access token is simply rejected."""

    endpoint: str | None = None
    """The IdP's token endpoint (http(s)). Without it, an expired token is simply rejected."""
    style: Literal["oauth2", "json"] = "oauth2"
    """`oauth2`: RFC 6749 §6 form POST `grant_type=refresh_token`, answer `access_token` and an optional
    `refresh_token`. `json`: `POST {fields.request: token}`, answer `{fields.access, fields.refresh}` (Django
    SimpleJWT)."""
    client_id: str | None = None
    """OAuth client id, sent with `oauth2` refresh calls and with revocations."""
    client_secret: str | None = None
    """OAuth client secret (use `${VAR}`), sent as `client_auth` says."""
    client_auth: Literal["post", "basic", "none"] = "post"
    """How the client authenticates: `post` (form fields), `basic` (RFC 6749 §2.3.1) or `none`."""
    fields: RefreshFields = RefreshFields()
    """JSON field names for `style: json`."""
    revocation_endpoint: str | None = None
    """RFC 7009 endpoint (http(s)): the refresh token at logout, and the successor of a reused refresh token, are
    revoked here."""
    timeout: float = Field(5, gt=0, le=120)
    """Seconds one IdP call may take; also the default timeout of the control-plane HTTP client."""
    grace_period: float = Field(30, ge=0, le=3600)
    """For this long after a rotation, a request carrying the superseded refresh token gets its successor, with no
    IdP call. At least `lock_lease`."""
    lock_lease: float = Field(5, gt=0, le=60)
    """Lease of the per-token refresh lock, renewed every `lock_lease / 4` while the IdP call runs."""
    wait_timeout: float = Field(30, gt=0, le=300)
    """How long a request waits for another's refresh before answering 503."""
    idp_reuse_window: float = Field(0, ge=0, le=3600)
    """How long the IdP itself accepts a just-used refresh token again (Auth0 reuse interval, Okta grace period,
    Keycloak max reuse). Above 0, an attempt whose answer was lost is retried once within it; at 0 the session
    ends cleanly (`refresh_lost`)."""
    tls: TLSConfig | None = None
    """TLS to the `https://` token and revocation endpoints."""

    @field_validator("endpoint", "revocation_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _grace(self) -> RefreshConfig:
        if self.endpoint is not None and self.grace_period < self.lock_lease:
            # Waiters look again every 0.25 s, but one look can take a store timeout (2 s) and the
            # owner's write-out a lease: the result must outlive that (issue 12, failure 7).
            raise key_problems(
                (
                    "grace_period",
                    f"{self.grace_period:g} s is shorter than refresh.lock_lease ({self.lock_lease:g} s): requests "
                    "waiting on another worker's refresh must find its result before it expires; raise "
                    "grace_period or lower lock_lease",
                )
            )
        return self
