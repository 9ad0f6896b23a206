"""Access-token verification: algorithms and keys from config, never from the token.

``Verifier.verify`` answers with a :class:`Verdict`: the claims of a fully valid token, or a
reason code (``bad_signature``, ``alg_not_allowed``, ``token_expired``, ...). A token that is
otherwise valid but expired (or about to expire) says so with ``refreshable``, which is the
only case where the refresh stage may step in. Verified tokens are cached until their ``exp``
so a repeated token costs no signature check. Opaque access tokens are verified by a subclass,
``introspection.OpaqueVerifier``, that asks the IdP instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.cache import BoundedCache
from gateway.config import TokensConfig
from gateway.errors import KeyFetchError
from gateway.keys import KeySource
from gateway.reasons import Reason

log = logging.getLogger("gateway.tokens")

MAX_TOKEN_BYTES = 16 * 1024
ACCESS_TYPES = frozenset({"jwt", "at+jwt", "application/at+jwt"})
CACHE_SIZE = 10_000
# Verdicts on a token whose signature checked out: its claims still serve revocation (``signed_claims``).
_REFUSED_ALIVE = frozenset({Reason.TOKEN_EXPIRED, Reason.TOKEN_REVOKED, Reason.STORE_UNAVAILABLE})


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verification concluded. ``claims`` is set only when the token may be used."""

    claims: dict[str, Any] | None
    reason: Reason | None = None
    refreshable: bool = False  # expired or near expiry, but otherwise fully valid
    exp: float = 0.0

    @property
    def ok(self) -> bool:
        return self.claims is not None


_ERRORS: list[tuple[type[Exception], Reason]] = [
    (jwt.InvalidSignatureError, Reason.BAD_SIGNATURE),
    (jwt.InvalidAudienceError, Reason.WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, Reason.WRONG_ISSUER),
    (jwt.MissingRequiredClaimError, Reason.MISSING_CLAIM),
    (jwt.InvalidAlgorithmError, Reason.ALG_NOT_ALLOWED),
    (jwt.InvalidKeyError, Reason.BAD_SIGNATURE),
    (jwt.DecodeError, Reason.MALFORMED_TOKEN),
    (jwt.InvalidTokenError, Reason.INVALID_TOKEN),
]


def number(value: Any) -> float | None:
    """A numeric claim as float; None for anything else (booleans included)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None  # NaN or infinity would make a token that never expires


def denial(denied: Container[object], claims: dict[str, Any]) -> Reason | None:
    """Why a token's ``jti`` is refused: on the denylist, or not knowable (``Denylist.unknown``: a worker that started
    while the store was unreachable knows no revocation made before; 503 until it does, never a 200). None: not."""
    jti = claims.get("jti")
    if jti in denied:
        return Reason.TOKEN_REVOKED
    return Reason.STORE_UNAVAILABLE if isinstance(jti, str) and getattr(denied, "unknown", False) else None


def _reason(exc: Exception) -> Reason:
    for kind, reason in _ERRORS:
        if isinstance(exc, kind):
            return reason
    return Reason.INVALID_TOKEN


class Verifier:
    """Verifies access tokens against the configured keys, issuer, audience and clock."""

    def __init__(
        self,
        config: TokensConfig,
        keys: KeySource,
        clock: Callable[[], float] = time.time,
        denied: Container[object] = frozenset(),
    ) -> None:
        self._config = config
        self._keys = keys
        self._clock = clock
        self._denied = denied  # revoked jti values (gateway.denylist), checked on every use
        self._algorithms = frozenset(config.algorithms)
        self._warned_lifetime = math.inf  # logged once per shorter lifetime seen, not once per token
        self._cache: BoundedCache[str, tuple[dict[str, Any], float]] = BoundedCache(CACHE_SIZE)
        keys.on_change(self._cache.clear)  # a key the IdP removed: what it verified is verified again
        self._required = tuple(config.required_claims)
        self._options: Any = {
            "require": list(self._required),  # PyJWT refuses a required claim that is absent or null
            # Time claims are checked below against our own clock, with leeway.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": config.audience is not None,
            "verify_iss": config.issuer is not None,
        }

    async def verify(self, token: str) -> Verdict:
        cached = self._cache.get(token)
        if cached is not None:
            return self._check_time(*cached)
        if len(token) > MAX_TOKEN_BYTES:
            return Verdict(None, Reason.TOKEN_TOO_LARGE)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return Verdict(None, Reason.MALFORMED_TOKEN)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            return Verdict(None, Reason.ALG_NOT_ALLOWED)
        if "crit" in header:
            # We implement no JWS extensions, so any critical one must be refused (RFC 7515 §4.1.11).
            return Verdict(None, Reason.UNSUPPORTED_CRIT)
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCESS_TYPES):
            return Verdict(None, Reason.WRONG_TOKEN_TYPE)
        kid = header.get("kid")
        try:
            key = await self._keys.key_for(kid if isinstance(kid, str) else None, alg)
        except KeyFetchError:
            return Verdict(None, Reason.KEYS_UNAVAILABLE)  # not the token's fault: 503, cookies kept
        if key is None:
            return Verdict(None, Reason.UNKNOWN_KEY)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self._options,
                audience=self._config.audience,
                issuer=self._config.issuer,
            )
        except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
            return Verdict(None, _reason(exc))
        if any(claims.get(name) == "" for name in self._required):
            return Verdict(None, Reason.MISSING_CLAIM)  # an empty sub names nobody
        if claims.get("token_type", "access") != "access" or claims.get("typ", "access") in ("refresh", "Refresh"):
            return Verdict(None, Reason.WRONG_TOKEN_TYPE)
        exp, nbf, iat = number(claims.get("exp")), number(claims.get("nbf", 0)), number(claims.get("iat", 0))
        if exp is None or nbf is None or iat is None:
            return Verdict(None, Reason.MALFORMED_TOKEN)
        now, leeway = self._clock(), self._config.leeway
        if nbf > now + leeway or iat > now + leeway:
            return Verdict(None, Reason.TOKEN_NOT_YET_VALID)
        self._remember(token, claims, exp)
        return self._check_time(claims, exp)

    async def signed_claims(self, token: str) -> dict[str, Any] | None:
        """Claims of a token whose signature (and iss/aud) verify, expired or not; for revocation only."""
        verdict = await self.verify(token)
        if verdict.claims is not None:
            return verdict.claims
        cached = self._cache.get(token)
        return cached[0] if cached is not None and verdict.reason in _REFUSED_ALIVE else None

    def on_key_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when a verification key stops being trusted (caches of verified tokens drop out)."""
        self._keys.on_change(listener)

    def _check_time(self, claims: dict[str, Any], exp: float) -> Verdict:
        refused = denial(self._denied, claims)
        if refused is not None:
            return Verdict(None, refused)
        now = self._clock()
        if now >= exp + self._config.leeway:
            return Verdict(None, Reason.TOKEN_EXPIRED, refreshable=True, exp=exp)
        due = exp - now < self.refresh_margin(claims, exp)
        return Verdict(claims, None, refreshable=due, exp=exp)

    def refresh_margin(self, claims: dict[str, Any], exp: float) -> float:
        """How long before ``exp`` this token is refreshed: ``refresh_before``, at most half its lifetime.

        A token that lives 10 s with ``refresh_before: 30`` would otherwise be due from the moment
        it is issued, and every request would call the IdP (issue 12, failure 11).
        """
        configured = self._config.refresh_before
        iat = number(claims.get("iat"))
        if iat is None or exp <= iat or exp - iat >= 2 * configured:
            return configured
        lifetime = exp - iat
        if lifetime < configured and lifetime < self._warned_lifetime:
            self._warned_lifetime = lifetime
            log.warning(
                "access tokens live %.0f s, less than tokens.refresh_before (%.0f s): refreshing %.0f s "
                "before expiry instead; tokens.leeway (%.0f s) accepts them that long past expiry. "
                "Set refresh_before and leeway well below the token lifetime.",
                lifetime,
                configured,
                lifetime / 2,
                self._config.leeway,
            )
        return lifetime / 2

    def _remember(self, token: str, claims: dict[str, Any], exp: float) -> None:
        self._cache.put(token, (claims, exp))
