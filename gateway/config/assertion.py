"""``identity.assertion``: the signed identity assertion the gateway adds to forwarded requests."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.config.base import HEADER_NAME, Model

MAX_ASSERTION_TTL = 3600
# Asymmetric only: the upstream verifies with the public key from {prefix}/.well-known/jwks.json,
# so nothing it holds can sign. HS* and none are never offered.
AssertionAlgorithm = Literal["ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA"]


DEFAULT_HEADER = "X-Gateway-Assertion"


class AssertionConfig(Model):
    """A short-lived JWT, signed by the gateway, on every authenticated request it forwards (HTTP and WebSocket
    handshakes), as Pomerium's `X-Pomerium-Jwt-Assertion`. Its claims are `sub`, the top-level claims the identity
    headers are built from, `aud` (the route's `upstream`, as configured), `iat`, `exp` and, when set, `iss`. The
    upstream verifies it with the public key served at `{prefix}/.well-known/jwks.json`. Anonymous requests
    (`auth: none`, or `optional` without a token) carry none. Every worker and replica must read the same key file."""

    header: str = DEFAULT_HEADER
    """The header that carries it. Always removed from client requests, on every route."""
    private_key_file: str
    """PEM private key that signs it (EC P-256 for ES256, P-384 for ES384, RSA of at least 2048 bits for RS*/PS256,
    Ed25519 or Ed448 for EdDSA). Read by `gateway check` and at start."""
    algorithm: AssertionAlgorithm = "ES256"
    """Signing algorithm. ES256 is the default and the cheapest to sign; HS* and `none` are never offered."""
    ttl: int = Field(60, gt=0, le=MAX_ASSERTION_TTL)
    """Seconds each assertion is valid (`exp - iat`). The gateway reuses one for the same token and upstream until
    half of it has passed, so an upstream sees assertions between `ttl/2` and `ttl` seconds from expiry."""
    issuer: str | None = None
    """The `iss` claim; none: no `iss`."""
    key_id: str | None = None
    """The `kid` in the assertion's header and in the JWKS; none: the key's RFC 7638 thumbprint."""
    publish_key_files: tuple[str, ...] = ()
    """PEM keys (public, or private ones of which only the public half is used) served in the JWKS beside the
    signing key, never signed with, each with its RFC 7638 thumbprint as `kid`: for a key rollover. Publish the
    next key here first; once every replica has it and upstreams' JWKS caches (5 minutes) have refreshed, sign
    with it (`private_key_file`) and publish the previous one here until its last assertions expire (`ttl`)."""

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid header name")
        return value

    @field_validator("issuer", "key_id")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value
