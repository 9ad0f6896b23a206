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


class TokensConfig(Model):
    algorithms: tuple[str, ...] = ("RS256",)
    secret: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway: float = Field(30, ge=0)
    refresh_before: float = Field(30, ge=0)
    revoke_superseded: bool = False

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
        if len(sources) != 1:
            problems.append(("secret", "set exactly one of secret, public_key_file, jwks_url"))
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
    request: str = "refresh"
    access: str = "access"
    refresh: str = "refresh"


class RefreshConfig(Model):
    endpoint: str | None = None
    style: Literal["oauth2", "json"] = "oauth2"
    client_id: str | None = None
    client_secret: str | None = None
    client_auth: Literal["post", "basic", "none"] = "post"
    fields: RefreshFields = RefreshFields()
    revocation_endpoint: str | None = None
    timeout: float = Field(5, gt=0, le=120)
    grace_period: float = Field(30, ge=0, le=3600)
    lock_lease: float = Field(5, gt=0, le=60)
    wait_timeout: float = Field(30, gt=0, le=300)
    # Auth0 "reuse interval", Okta "grace period", Keycloak "refresh token max reuse": how long the
    # IdP accepts a just-used refresh token again. Above 0, an attempt whose answer was lost is
    # retried once within it instead of ending the session (docs/refresh.md).
    idp_reuse_window: float = Field(0, ge=0, le=3600)

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
