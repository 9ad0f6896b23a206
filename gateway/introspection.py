"""Opaque access tokens: the IdP is asked what they mean, and its answer is cached.

    token ─► keyed hash h (the cache key and the log name: the token itself is neither)
          ─► an answer cached for h, until min(its exp, asked + cache)        a dict lookup, no I/O
          ─► else one call per h and process (concurrent requests join it):
               tokens.introspection  POST token, token_type_hint=access_token, client auth (RFC 7662 §2.1)
               tokens.userinfo       GET with Authorization: Bearer (OpenID Connect Core §5.3)
          ─► a Verdict: the answer's fields as claims; or ``token_expired`` (``active: false``, userinfo 401:
             a refresh trigger, as an expired JWT is); or ``introspection_unavailable`` (down, slow, a refusal
             of the gateway, garbage: 503, cookies kept, nothing cached, logged)

``OpaqueVerifier`` is a ``tokens.Verifier``: every stage that verifies access tokens (authn, refresh and
redemption, login, capture, logout) uses it as it is. The answer's claims go through the same rules as a
JWT's: ``required_claims`` (but ``exp``, which userinfo never tells), ``issuer``/``audience`` when set, the
denylist by ``jti``. An answer without a ``jti`` gets ``opaque:<h>``, so that logout,
``revoke_superseded`` and the end of a session family refuse the token like a JWT.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from gateway.cache import BoundedCache
from gateway.config import IntrospectionConfig, TokensConfig, UserinfoConfig
from gateway.errors import IntrospectionFailed
from gateway.keys import KeySource, StaticKey
from gateway.reasons import Reason
from gateway.tls import tls_failure
from gateway.tokens import CACHE_SIZE, MAX_TOKEN_BYTES, Verdict, Verifier, denial, number

log = logging.getLogger("gateway.tokens")

MAX_ANSWER_BYTES = 64 * 1024  # an answer is a few hundred bytes; a bigger body is not one
_TOKEN = re.compile(r"[\x21-\x7e]+")  # RFC 6750 b64token and anything else printable: never a header break
_REFRESH_TYPES = frozenset({"refresh_token", "refresh"})


class Lookup(Protocol):
    async def ask(self, token: str) -> dict[str, Any] | Reason:
        """The IdP's claims for an active token, or why it is not one; raises IntrospectionFailed."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the IdP said about one token, kept until ``until``."""

    claims: dict[str, Any] | None
    reason: Reason | None
    exp: float | None  # the token's own expiry, when the IdP told it
    until: float


class Introspection:
    """RFC 7662 introspection with the gateway's client credentials."""

    def __init__(self, config: IntrospectionConfig, client: httpx.AsyncClient) -> None:
        self._config = config
        self._client = client

    async def ask(self, token: str) -> dict[str, Any] | Reason:
        c = self._config
        form = {"token": token, "token_type_hint": "access_token"}
        headers = {"Accept": "application/json"}
        if c.client_auth == "basic":
            # RFC 6749 §2.3.1: form-urlencode each part before base64.
            raw = f"{quote(c.client_id, safe='')}:{quote(c.client_secret or '', safe='')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        else:
            form["client_id"] = c.client_id
            if c.client_secret is not None:
                form["client_secret"] = c.client_secret
        status, body = await _call(self._client, "POST", c.endpoint, c.timeout, data=form, headers=headers)
        if status != 200:
            raise IntrospectionFailed(f"{c.endpoint} answered status {status}")
        answer = _object(body, c.endpoint)
        active = answer.pop("active", None)
        if active is False:
            return Reason.TOKEN_EXPIRED  # expired, revoked or never issued: RFC 7662 §2.2 tells no more
        if active is not True:
            raise IntrospectionFailed(f"{c.endpoint} answered without a boolean active")
        return answer


class Userinfo:
    """The OIDC userinfo endpoint, asked with the token itself."""

    def __init__(self, config: UserinfoConfig, client: httpx.AsyncClient) -> None:
        self._config = config
        self._client = client

    async def ask(self, token: str) -> dict[str, Any] | Reason:
        c = self._config
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        status, body = await _call(self._client, "GET", c.endpoint, c.timeout, headers=headers)
        if status == 401:
            return Reason.TOKEN_EXPIRED  # RFC 6750 §3.1 invalid_token: expired or revoked
        if status == 403:
            return Reason.INVALID_TOKEN  # insufficient_scope (no openid): a refresh would not change it
        if status != 200:
            raise IntrospectionFailed(f"{c.endpoint} answered status {status}")
        return _object(body, c.endpoint)


class OpaqueVerifier(Verifier):
    """A ``Verifier`` for opaque access tokens: ``lookup`` asks the IdP, answers are kept ``cache`` seconds."""

    def __init__(
        self,
        config: TokensConfig,
        lookup: Lookup,
        *,
        cache: float,
        token_hash: Callable[[str], str],
        clock: Callable[[], float] = time.time,
        denied: Container[object] = frozenset(),
        on_call: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, _NO_KEYS, clock, denied)
        self._on_call = on_call or (lambda result: None)  # metrics: every call that was made, by result
        self._lookup = lookup
        self._bound = cache
        self._hash = token_hash
        self._answers: BoundedCache[str, Answer] = BoundedCache(CACHE_SIZE)
        self._asking: dict[str, asyncio.Future[Answer]] = {}
        self._rules = tuple(name for name in config.required_claims if name != "exp")

    async def verify(self, token: str) -> Verdict:
        if len(token) > MAX_TOKEN_BYTES:
            return Verdict(None, Reason.TOKEN_TOO_LARGE)
        h = self._hash(token)
        answer = self._answers.get(h)
        now = self._clock()
        if answer is None or now >= answer.until:
            if not _TOKEN.fullmatch(token):
                return Verdict(None, Reason.MALFORMED_TOKEN)  # never sent anywhere
            try:
                answer = await self._ask(h, token)
            except IntrospectionFailed as exc:
                log.warning("opaque token=%s: %s; answering 503", h[:12], exc)
                return Verdict(None, Reason.INTROSPECTION_UNAVAILABLE)
        return self._judge(answer, now)

    async def signed_claims(self, token: str) -> dict[str, Any] | None:
        """The claims the IdP gave for this token, expired since or not (for revocation and scopes)."""
        answer = self._answers.get(self._hash(token)) if len(token) <= MAX_TOKEN_BYTES else None
        if answer is not None and answer.claims is not None:
            return answer.claims
        return (await self.verify(token)).claims

    def refresh_margin(self, claims: dict[str, Any], exp: float) -> float:
        """``exp`` here is when the cached answer lapses (``Verdict.exp``): the fast path serves the token until
        that, or until the token's own refresh margin begins, whichever comes first."""
        real = number(claims.get("exp"))
        if real is None:
            return 0.0
        return max(0.0, exp - real + super().refresh_margin(claims, real))

    def _judge(self, answer: Answer, now: float) -> Verdict:
        claims, exp = answer.claims, answer.exp
        if claims is None:
            return Verdict(None, answer.reason, refreshable=answer.reason == Reason.TOKEN_EXPIRED)
        refused = denial(self._denied, claims)
        if refused is not None:
            return Verdict(None, refused)
        due = False
        if exp is not None:
            if now >= exp + self._config.leeway:
                return Verdict(None, Reason.TOKEN_EXPIRED, refreshable=True, exp=exp)
            due = exp - now < super().refresh_margin(claims, exp)
        return Verdict(claims, None, refreshable=due, exp=answer.until)

    async def _ask(self, h: str, token: str) -> Answer:
        """One call per token and process: concurrent requests join the one in flight."""
        flight = self._asking.get(h)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch(h, token))
            self._asking[h] = flight
            flight.add_done_callback(lambda _: self._asking.pop(h, None))
        # Shielded: a client that goes away does not cancel the answer others wait for.
        return await asyncio.shield(flight)

    async def _fetch(self, h: str, token: str) -> Answer:
        asked = self._clock()
        try:
            answer = self._answer(h, await self._lookup.ask(token), asked)
        except IntrospectionFailed:
            self._on_call("error")
            raise
        self._on_call("active" if answer.claims is not None else "inactive")
        return self._answers.put(h, answer)

    def _answer(self, h: str, said: dict[str, Any] | Reason, asked: float) -> Answer:
        until = asked + self._bound
        if isinstance(said, Reason):
            return Answer(None, said, None, until)
        exp = number(said.get("exp"))
        if "exp" in said and exp is None:
            raise IntrospectionFailed("the answer's exp is not a number")
        refused = self._refusal(said)
        if refused is not None:
            return Answer(None, refused, exp, until)
        said.setdefault("jti", f"opaque:{h}")
        return Answer(said, None, exp, until if exp is None else min(until, exp))

    def _refusal(self, claims: dict[str, Any]) -> Reason | None:
        """What the configured rules refuse in an answer: required claims, issuer, audience, a refresh token."""
        if any(claims.get(name) in (None, "") for name in self._rules):
            return Reason.MISSING_CLAIM
        config = self._config
        if config.issuer is not None and claims.get("iss") != config.issuer:
            return Reason.WRONG_ISSUER
        aud = claims.get("aud")
        if config.audience is not None and config.audience != aud and config.audience not in _list(aud):
            return Reason.WRONG_AUDIENCE
        kind = claims.get("token_type")
        if isinstance(kind, str) and kind.lower() in _REFRESH_TYPES:
            return Reason.WRONG_TOKEN_TYPE
        return None


def build_verifier(
    config: TokensConfig,
    keys: KeySource,
    client: Callable[[str], httpx.AsyncClient],
    *,
    token_hash: Callable[[str], str],
    clock: Callable[[], float] = time.time,
    denied: Container[object] = frozenset(),
    on_call: Callable[[str], None] | None = None,
) -> Verifier:
    """The verifier ``tokens`` configures: JWTs with ``keys``, or opaque tokens asked about at the IdP.

    ``client(section)`` is the control-plane client for ``tokens.introspection`` or ``tokens.userinfo``;
    ``on_call(result)`` counts the calls made.
    """
    lookup: Lookup
    if config.introspection is not None:
        lookup, cache = Introspection(config.introspection, client("tokens.introspection")), config.introspection.cache
    elif config.userinfo is not None:
        lookup, cache = Userinfo(config.userinfo, client("tokens.userinfo")), config.userinfo.cache
    else:
        return Verifier(config, keys, clock, denied)
    return OpaqueVerifier(
        config, lookup, cache=cache, token_hash=token_hash, clock=clock, denied=denied, on_call=on_call
    )


_NO_KEYS = StaticKey(None)  # an OpaqueVerifier verifies no signature


async def _call(
    client: httpx.AsyncClient, method: str, url: str, timeout: float, **options: Any
) -> tuple[int, bytes | None]:
    """(status, body; None when over ``MAX_ANSWER_BYTES``) of one call; IntrospectionFailed when it fails."""
    try:
        async with (
            asyncio.timeout(timeout),
            client.stream(method, url, timeout=timeout, follow_redirects=False, **options) as response,
        ):
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
                return response.status_code, None
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    return response.status_code, None
            return response.status_code, body
    except (TimeoutError, httpx.HTTPError) as exc:
        raise IntrospectionFailed(f"{url} unreachable ({tls_failure(url, exc) or exc.__class__.__name__})") from None


def _object(body: bytes | None, url: str) -> dict[str, Any]:
    """The answer as a JSON object; IntrospectionFailed for anything else."""
    try:
        data = json.loads(body) if body is not None else None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        data = None
    if not isinstance(data, dict):
        raise IntrospectionFailed(f"{url} answered something other than a JSON object")
    return data


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
