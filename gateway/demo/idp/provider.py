"""The demo IdP's token logic, without HTTP: login families, refresh token rotation, reuse detection,
injected latency and failures, and the redemption ledger.

Every refresh token may be redeemed once; presenting a redeemed one revokes its whole family, as
node-oidc-provider and SimpleJWT with BLACKLIST_AFTER_ROTATION do (RFC 9700 §4.14.2), unless a reuse
window lets the previous token be redeemed again for a while (Auth0's reuse interval, Okta's grace
period). State lives in memory: one process, one event loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.demo.idp.faults import CONSUMING_FAILURES, Keyring, Ledger, LedgerEvent, spoil
from gateway.demo.idp.settings import IdPSettings, SigningKey, new_rsa_key


@dataclass
class Counters:
    refresh_calls: int = 0
    refresh_ok: int = 0
    refresh_rejected: int = 0
    reuse_detected: int = 0
    families_revoked: int = 0
    logins: int = 0  # password grant, SimpleJWT login and the OIDC login form
    revocations: int = 0
    authorize_requests: int = 0  # GET /authorize, valid or not
    code_exchanges: int = 0  # grant_type=authorization_code requests from an authenticated client
    jwks_requests: int = 0  # GET /jwks and /.well-known/jwks.json, up or down


@dataclass
class Family:
    """One login's chain of refresh tokens; only ``current`` may be redeemed (and ``previous`` in a reuse window)."""

    id: str
    username: str
    claims: dict[str, Any]
    current: str = ""
    revoked: bool = False
    revoked_reason: Literal["reuse", "revocation"] | None = None
    previous: str | None = None  # the token the last rotation redeemed
    rotated_at: float = 0.0  # time.monotonic() of that rotation
    issued: list[str] = field(default_factory=list)  # every refresh jti, oldest first

    def summary(self) -> dict[str, Any]:
        keys = ("id", "username", "current", "previous", "revoked", "revoked_reason", "issued")
        return {k: getattr(self, k) for k in keys} | {"sid": self.claims.get("sid")}


@dataclass
class TokenPair:
    access: str
    refresh: str
    expires_in: int
    family: Family


@dataclass
class Outcome:
    """What a refresh request produced: tokens (None when rejected) and an injected failure to render."""

    pair: TokenPair | None
    fail: str | None = None


class IdentityProvider:
    """The IdP's state and what it does with tokens; ``endpoints``, ``admin`` and ``oidc`` put it on HTTP."""

    def __init__(self, settings: IdPSettings) -> None:
        self.settings = settings
        self.counters = Counters()
        self.behaviour = settings.behaviour()
        self.ledger = Ledger()
        self.families: dict[str, Family] = {}
        self._redeem_lock = asyncio.Lock()
        self.keyring = Keyring(settings.kid, settings.rsa_key)  # RS256 only
        self._rogue_key: SigningKey | None = None  # signs the "bad_signature" tokens

    def now(self) -> float:
        """The IdP's clock: the time plus ``clock_skew``; what issued tokens' iat/exp are based on."""
        return time.time() + self.behaviour.clock_skew

    def sign(self, claims: dict[str, Any], key: SigningKey | None = None, typ: str = "JWT") -> str:
        """A JWT over ``claims`` with the IdP's current key (or ``key``), alg and kid."""
        rs256 = self.settings.algorithm == "RS256"
        headers = {"typ": typ} | ({"kid": self.keyring.kid} if rs256 else {})
        signing_key = key or (self.keyring.keys[self.keyring.kid] if rs256 else self.settings.hs_secret)
        return jwt.encode(claims, signing_key, algorithm=self.settings.algorithm, headers=headers)

    def _access(self, family: Family, ttl: int, key: SigningKey | None = None) -> str:
        now = int(self.now())
        user = self.settings.users.get(family.username)
        claims: dict[str, Any] = {"iss": self.settings.issuer, "sub": family.username, "iat": now, "exp": now + ttl}
        if self.behaviour.clock_skew:
            claims["nbf"] = now
        if self.settings.audience is not None:
            claims["aud"] = self.settings.audience
        claims |= {"jti": uuid.uuid4().hex, "token_type": "access"}
        if self.behaviour.groups:  # big tokens, as Entra ID and Keycloak issue them
            claims["groups"] = [f"{n:08x}-0000-4000-8000-{n:012x}" for n in range(self.behaviour.groups)]
        return self.sign(claims | (user["claims"] if user else {}) | family.claims, key)

    def _issue(self, family: Family, access_ttl: int | None = None) -> TokenPair:
        """Sign a new pair; the new refresh token becomes the family's current one."""
        now = int(self.now())
        family.current = uuid.uuid4().hex
        family.issued.append(family.current)
        refresh = self.sign(
            {
                "iss": self.settings.issuer,
                "sub": family.username,
                "iat": now,
                "exp": now + self.settings.refresh_ttl,
                "jti": family.current,
                "token_type": "refresh",
                "fam": family.id,
            }
        )
        ttl = self.settings.access_ttl if access_ttl is None else access_ttl
        return TokenPair(self._access(family, ttl), refresh, ttl, family)

    def start_session(self, username: str, claims: dict[str, Any] | None = None, ttl: int | None = None) -> TokenPair:
        """Log ``username`` in: a new family. ``claims`` override the user's in every access token it gets."""
        family = Family(uuid.uuid4().hex, username, dict(claims or {}))
        self.families[family.id] = family
        return self._issue(family, ttl)

    def decode(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this IdP signed (with any of its keys), expired or not."""
        return self._decode(token)

    def _decode(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this IdP signed (with any of its keys), expired or not."""
        try:
            key: str | rsa.RSAPublicKey = self.settings.hs_secret
            if self.settings.algorithm == "RS256":
                kid = jwt.get_unverified_header(token).get("kid", self.keyring.kid)
                key = self.keyring.keys[kid].public_key()
            return jwt.decode(
                token,
                key,
                algorithms=[self.settings.algorithm],
                issuer=self.settings.issuer,
                # The caller checks exp, on the IdP's (maybe skewed) clock; iat and nbf are not checked.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "require": ["exp", "jti", "sub"],
                },
            )
        except (jwt.InvalidTokenError, KeyError, TypeError):  # TypeError: a kid that is not a string
            return None

    def _refresh_claims(self, token: str | None) -> dict[str, Any] | None:
        """The claims of one of this IdP's refresh tokens (expired or not), else None."""
        claims = self._decode(token) if token else None
        return claims if claims is not None and claims.get("token_type") == "refresh" else None

    def revoke_family(self, family: Family, reason: Literal["reuse", "revocation"] = "revocation") -> None:
        """End a login: none of the family's refresh tokens can be redeemed any more."""
        if not family.revoked:
            family.revoked, family.revoked_reason = True, reason
            self.counters.families_revoked += 1

    def _log(self, claims: dict[str, Any] | None, event: LedgerEvent) -> None:
        jti, family = (str(claims["jti"]), str(claims.get("fam"))) if claims else (None, None)
        self.ledger.record(jti, family, event)

    def _redeem(self, claims: dict[str, Any] | None) -> TokenPair | None:
        family = self.families.get(str(claims.get("fam"))) if claims else None
        if claims is None or family is None or family.revoked or int(claims["exp"]) <= self.now():
            self._log(claims, "rejected")
            return None
        b, now = self.behaviour, time.monotonic()
        if claims["jti"] == family.current:
            family.previous, family.rotated_at = family.current, now
            self._log(claims, "redeemed")
            return self._issue(family)
        if claims["jti"] == family.previous and b.reuse_window > 0 and now - family.rotated_at <= b.reuse_window:
            # Inside the reuse window the previous token buys another pair; what the first redemption
            # issued is no longer current. The window stays anchored at that first redemption.
            self._log(claims, "reused_in_window")
            return self._issue(family)
        # A token of this family that is no longer current was redeemed before: someone holds a
        # copy, so end the session for everyone (RFC 9700 §4.14.2), unless told to only refuse it.
        self.counters.reuse_detected += 1
        self._log(claims, "reused")
        if b.reuse_revokes_family:
            self.revoke_family(family, "reuse")
        return None

    def _take_failure(self) -> str | None:
        b = self.behaviour
        if b.fail is None:
            return None
        fail = b.fail
        if b.fail_count is not None:
            b.fail_count -= 1
            if b.fail_count <= 0:
                b.fail, b.fail_count = None, None
        return fail

    async def refresh(self, presented: str | None) -> Outcome:
        """Redeem a refresh token, honouring injected latency and failures; every call is in the ledger."""
        # Decided on arrival, so concurrent requests meet failures in the order they came.
        fail = self._take_failure()
        claims = self._refresh_claims(presented)
        consuming = fail is None or fail in CONSUMING_FAILURES
        if not consuming:
            self._log(claims, "failed")
        if self.behaviour.latency > 0:
            await asyncio.sleep(self.behaviour.latency)
        if fail == "timeout":
            await asyncio.sleep(3600)
        if not consuming:
            return Outcome(None, fail)
        # The lock makes "is it current? then rotate" one step even if redemption ever awaits,
        # so of two simultaneous redemptions exactly one wins and the other is reuse.
        async with self._redeem_lock:
            pair = self._redeem(claims)
        if pair is None:
            self.counters.refresh_rejected += 1
        else:
            self.counters.refresh_ok += 1
        if fail == "redeem_then_hang":
            await asyncio.sleep(3600)
        return Outcome(pair, fail)

    def tokens_body(self, pair: TokenPair, fail: str | None, access_key: str, refresh_key: str) -> dict[str, Any]:
        """The success body, spoiled as an injected failure asks (``no_access``, ``bad_signature``, ``spoil``)."""
        body: dict[str, Any] = spoil({access_key: pair.access, refresh_key: pair.refresh}, fail, self._scope(pair))
        if fail == "no_access":
            del body[access_key]
        elif fail == "bad_signature":
            if self._rogue_key is None:
                rs256 = self.settings.algorithm == "RS256"
                self._rogue_key = new_rsa_key() if rs256 else "a-different-secret-that-nobody-trusts!"
            body[access_key] = self._access(pair.family, pair.expires_in, self._rogue_key)
        return body

    def _scope(self, pair: TokenPair) -> str:
        """The scope the family's access tokens carry (``openid`` when they name none)."""
        user = self.settings.users.get(pair.family.username)
        scope = ((user["claims"] if user else {}) | pair.family.claims).get("scope")
        return scope if isinstance(scope, str) else "openid"

    def client_ok(self, form: dict[str, str], basic: tuple[str, str] | None) -> bool:
        """Whether the client authenticated as ``settings.client_auth`` allows: by the posted ``form``
        (client_id, client_secret) or by HTTP Basic credentials (``basic``: id and secret, or None)."""
        s = self.settings
        posted = (form.get("client_id"), form.get("client_secret"))
        if s.client_auth == "none":
            return form.get("client_id", s.client_id) == s.client_id
        if basic is not None and s.client_auth in ("basic", "any"):
            return basic == (s.client_id, s.client_secret)
        if basic is None and posted[1] is not None and s.client_auth in ("post", "any"):
            return posted == (s.client_id, s.client_secret)
        return False

    def refuse_client(self, presented: str | None) -> None:
        """Count and log a refresh request refused because its client did not authenticate."""
        self.counters.refresh_rejected += 1
        self._log(self._refresh_claims(presented), "rejected")

    def login(self, username: object, password: object) -> TokenPair | None:
        """A password login: a new family for a known user with the right password, else None."""
        if not isinstance(username, str):
            return None
        user = self.settings.users.get(username)
        if user is None or user["password"] != password:
            return None
        self.counters.logins += 1
        return self.start_session(username)

    def revoke(self, token: str) -> None:
        """Revoke ``token`` (RFC 7009): the family of a refresh token of this IdP, else nothing."""
        self.counters.revocations += 1
        # Expired tokens may still be revoked; unknown or invalid ones are ignored (RFC 7009 §2.2).
        # Access tokens are accepted but change nothing: they are self-contained and short-lived.
        # With revoke_used false, a token already used is all that is revoked (SimpleJWT's blacklist),
        # which changes nothing here: it could not be redeemed anyway.
        claims = self._refresh_claims(token)
        family = self.families.get(str(claims.get("fam"))) if claims else None
        if (
            claims is not None
            and family is not None
            and (self.behaviour.revoke_used or claims["jti"] == family.current)
        ):
            self.revoke_family(family)

    def reset(self) -> None:
        """Zero the counters, clear the ledger and return to the start-up behaviour (keys and families stay)."""
        self.counters = Counters()
        self.behaviour = self.settings.behaviour()
        self.ledger.clear()

    async def rotate_key(self, drop_old: bool) -> str:
        """Sign with a new RSA key under a new kid (returned) from now on; RS256 only."""
        key = await asyncio.to_thread(new_rsa_key)  # ~0.1 s of CPU: keep answering meanwhile
        return self.keyring.rotate(key, drop_old)
