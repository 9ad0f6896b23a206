"""The signed identity assertion: a short-lived JWT that says who the request is for, signed by the gateway.

An upstream that cannot trust the network (or does not want to trust plain identity headers) verifies it
with the public key at ``{prefix}/.well-known/jwks.json``, as with Pomerium's ``X-Pomerium-Jwt-Assertion``:

    header   {"alg": identity.assertion.algorithm, "kid": key_id or the RFC 7638 thumbprint, "typ": "JWT"}
    claims   sub and the top-level claims the identity headers are built from, as the access token has them;
             aud = the route's upstream (routes[].upstream as configured); iat; exp = iat + ttl; iss when set

Signing costs (an ES256 signature ~50 µs, RSA ~1 ms) would show on the hot path, so an assertion is kept per
(access token, route) and served again until half its lifetime has passed: an upstream always gets one with
at least ``ttl / 2`` seconds left. The cache is bounded like every cache on the request path.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from gateway.cache import BoundedCache
from gateway.config import AssertionConfig, load_published_key, load_signing_key
from gateway.routing import Route

# RFC 7638 §3.2: the members of the thumbprint, by key type.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of a public JWK."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def audience(route: Route) -> str:
    """The route's upstream as configured (``routes[].upstream``, without a trailing ``/``)."""
    return f"{route.upstream.origin}{route.upstream.base_path}"


class Assertion:
    """Signs (and keeps) assertions for one config generation; ``jwks`` is what the upstream verifies them with."""

    def __init__(self, config: AssertionConfig, claim_paths: Iterable[str], clock: Callable[[], float]) -> None:
        self.name = config.header.lower()
        self._key = load_signing_key(config)  # checked by validate_files before any generation is built
        self._algorithm = config.algorithm
        self._ttl = config.ttl
        self._issuer = config.issuer
        self._clock = clock
        public = get_default_algorithms()[config.algorithm].to_jwk(self._key.public_key(), as_dict=True)
        self.kid = config.key_id or thumbprint(public)
        keys = [{**public, "kid": self.kid, "alg": config.algorithm, "use": "sig"}]
        for index, path in enumerate(config.publish_key_files):  # a rollover's next or previous key
            where = f"identity.assertion.publish_key_files[{index}]"
            other = get_default_algorithms()[config.algorithm].to_jwk(
                load_published_key(path, config.algorithm, where), as_dict=True
            )
            keys.append({**other, "kid": thumbprint(other), "alg": config.algorithm, "use": "sig"})
        self.jwks: dict[str, Any] = {"keys": keys}
        # A dotted path (realm_access.roles) sends its top-level claim; an exact key with dots is itself.
        self._paths = tuple(dict.fromkeys(["sub", *claim_paths]))
        # (access token, route name) -> (assertion, when to sign a new one)
        self._kept: BoundedCache[tuple[str, str], tuple[str, float]] = BoundedCache()

    def header(self, token: str | None, claims: dict[str, Any], route: Route) -> tuple[str, str]:
        """The header for a request authenticated with ``token`` (whose verified ``claims`` these are) to ``route``."""
        if token is None:
            return self.name, self._sign(claims, route)
        key = (token, route.name)
        kept = self._kept.get(key)
        if kept is None or self._clock() >= kept[1]:
            kept = self._kept.put(key, (self._sign(claims, route), self._clock() + self._ttl / 2))
        return self.name, kept[0]

    def claims(self, claims: dict[str, Any], route: Route) -> dict[str, Any]:
        """What the assertion says about this identity, for this route, from now on."""
        now = int(self._clock())
        out: dict[str, Any] = {}
        for path in self._paths:
            top = path if path in claims else path.split(".", 1)[0]
            if top in claims and claims[top] is not None:
                out[top] = claims[top]
        out.update(aud=audience(route), iat=now, exp=now + self._ttl)
        if self._issuer is not None:
            out["iss"] = self._issuer
        return out

    def _sign(self, claims: dict[str, Any], route: Route) -> str:
        return jwt.encode(
            self.claims(claims, route), self._key, algorithm=self._algorithm, headers={"kid": self.kid, "typ": "JWT"}
        )
