"""Verification keys: a shared secret, a PEM public key file, or a JWKS URL.

The key is chosen by configuration and, for JWKS, by the token's ``kid``; never by ``jku``,
``jwk`` or ``x5u`` headers a token may carry. A JWKS is fetched at start, then again as the
answer's ``Cache-Control: max-age`` says, never sooner than ``MIN_MAX_AGE`` and never later than
``tokens.jwks_max_age``: a key the IdP removed stops being trusted after the next good fetch
(and what was verified with it is forgotten, see ``on_change``). It is also refetched when a
token names an unknown ``kid``, at most once per ``min_refetch`` seconds, so a flood of forged
kids cannot hammer the IdP. The last good set is kept while the endpoint is down; an unknown
``kid`` meanwhile raises ``KeyFetchError`` (503 ``keys_unavailable``: an IdP outage during a key
rollover is not a logout). Keys too weak to trust (RSA under 2048 bits, a symmetric key in a
public set) are left out, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import httpx
import jwt

from gateway.config import TokensConfig, key_weakness, load_public_key
from gateway.errors import KeyFetchError
from gateway.tls import tls_failure

log = logging.getLogger("gateway.keys")

MIN_MAX_AGE = 60.0  # an IdP's max-age below this (no-cache, max-age=0) is not followed: no hammering


class KeySource(Protocol):
    async def key_for(self, kid: str | None, alg: str) -> Any:
        """The key that verifies a token with this header, or None when there is none.

        Raises KeyFetchError when the key is unknown and the keys cannot be fetched right now.
        """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a key stops being trusted (removed or replaced)."""


class StaticKey:
    """One key for every token (HS secret or PEM public key)."""

    def __init__(self, key: Any) -> None:
        self._key = key

    async def key_for(self, kid: str | None, alg: str) -> Any:
        return self._key

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def on_change(self, listener: Callable[[], None]) -> None:
        return None  # a configured key never changes while the process runs


class JWKSKeys:
    """Keys from a JWKS URL: cached, refreshed as the IdP's max-age says and on an unknown kid."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        max_age: float = 600.0,
        min_refetch: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._url = url
        self._client = client
        self._max_age = max_age
        self._min_refetch = min_refetch
        self._clock = clock
        self._sleep = sleep
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._healthy = False  # the last fetch succeeded
        self.refresh_in = max_age  # seconds from the last fetch to the next scheduled one
        self._lock = asyncio.Lock()
        self._on_fetch = on_fetch or (lambda ok: None)
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Future[None] | None = None

    async def start(self) -> None:
        try:
            await self._fetch()
        except KeyFetchError as exc:
            log.warning("jwks: initial fetch failed, will retry on first token: %s", exc)
        self._task = asyncio.ensure_future(self._keep_fresh())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def key_for(self, kid: str | None, alg: str) -> Any:
        jwk = self._lookup(kid)
        if jwk is None:
            async with self._lock:
                jwk = self._lookup(kid)
                due = self._fetched_at is None or self._clock() - self._fetched_at >= self._min_refetch
                if jwk is None and due:
                    try:
                        await self._fetch()
                    except KeyFetchError as exc:
                        log.warning("jwks: refetch failed, keeping %d cached keys: %s", len(self._keys), exc)
                    jwk = self._lookup(kid)
                if jwk is None and not self._healthy:
                    # The key may be one the IdP just rolled over to: we cannot tell, so not a 401.
                    raise KeyFetchError(f"{self._url}: unknown kid and the JWKS cannot be fetched")
        if jwk is None or (jwk.algorithm_name and jwk.algorithm_name != alg and "alg" in jwk._jwk_data):
            return None
        return jwk.key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _keep_fresh(self) -> None:
        """Fetch again when the last fetch (whoever made it) is ``refresh_in`` old; failures keep the last keys."""
        while True:
            last = self._fetched_at if self._fetched_at is not None else self._clock()
            wait = last + self.refresh_in - self._clock()
            if wait > 0:
                await self._sleep(wait)
                continue  # an unknown kid may have caused a fetch meanwhile
            async with self._lock:
                try:
                    await self._fetch()
                except KeyFetchError as exc:
                    log.warning("jwks: scheduled refetch failed, keeping %d cached keys: %s", len(self._keys), exc)
                except Exception:  # noqa: BLE001 - the timer must outlive any surprise, or keys go stale for good
                    log.exception("jwks: scheduled refetch failed unexpectedly; keeping the cached keys")

    async def _fetch(self) -> None:
        self._fetched_at = self._clock()
        try:
            response = await self._client.get(self._url, timeout=5.0, follow_redirects=False)
            response.raise_for_status()
            jwks = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, RecursionError, jwt.PyJWKSetError, jwt.InvalidKeyError) as exc:
            self._healthy = False
            self.refresh_in = min(self._max_age, MIN_MAX_AGE)
            self._on_fetch(False)
            raise KeyFetchError(f"{self._url}: {tls_failure(self._url, exc) or exc.__class__.__name__}") from None
        self._on_fetch(True)
        keys: dict[str | None, jwt.PyJWK] = {}
        for key in jwks.keys:
            weak = "is a symmetric key" if key.key_type == "oct" else key_weakness(key.key)
            if weak is not None:
                log.warning("jwks: ignoring key kid=%s from %s: it %s", key.key_id, self._url, weak)
            elif key.public_key_use in (None, "sig"):
                keys[key.key_id] = key
        gone = [kid for kid, old in self._keys.items() if kid not in keys or keys[kid]._jwk_data != old._jwk_data]
        self._keys, self._healthy = keys, True
        self.refresh_in = min(max(_max_age(response.headers), MIN_MAX_AGE), self._max_age)
        log.info("jwks: fetched %d keys from %s; next fetch in %.0f s", len(keys), self._url, self.refresh_in)
        if gone:
            log.warning("jwks: keys no longer published, no longer trusted: kid=%s", ", ".join(map(str, gone)))
            for listener in self._listeners:
                listener()


def _max_age(headers: httpx.Headers) -> float:
    """How long the answer may be reused, from ``Cache-Control`` (RFC 9111 §5.2.2.1) less ``Age``; inf if unsaid."""
    seconds = float("inf")
    for directive in headers.get("cache-control", "").lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-cache", "no-store"):
            return 0.0
        if name == "max-age" and value.strip('"').isdigit():
            seconds = float(value.strip('"'))
    age = headers.get("age", "")
    return max(seconds - float(age), 0.0) if age.isdigit() else seconds


def build_key_source(
    config: TokensConfig, client: httpx.AsyncClient, on_fetch: Callable[[bool], None] | None = None
) -> KeySource:
    """The configured key source; a bad key file is a ConfigError (``config.validate_files`` reports it first)."""
    if config.secret is not None:
        return StaticKey(config.secret.encode())
    if config.public_key_file is not None:
        return StaticKey(load_public_key(config.public_key_file, config.algorithms))
    if config.jwks_url is None:
        if config.opaque is not None:
            return StaticKey(None)  # opaque access tokens are asked about, never verified with a key
        # Unreachable: TokensConfig refuses anything but exactly one key source (gateway.config.tokens).
        raise ValueError("TokensConfig without a key source")
    return JWKSKeys(config.jwks_url, client, max_age=config.jwks_max_age, on_fetch=on_fetch)
