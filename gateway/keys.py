"""Verification keys: a shared secret, a PEM public key file, or a JWKS URL.

The key is chosen by configuration and, for JWKS, by the token's ``kid``; never by ``jku``,
``jwk`` or ``x5u`` headers a token may carry. A JWKS is fetched at start, cached, refetched when
a token names an unknown ``kid`` (at most once per ``min_refetch`` seconds, so a flood of forged
kids cannot hammer the IdP), and the last good set is kept when the endpoint is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx
import jwt

from gateway.config import TokensConfig, load_public_key
from gateway.errors import KeyFetchError

log = logging.getLogger("gateway.keys")


class KeySource(Protocol):
    async def key_for(self, kid: str | None, alg: str) -> Any:
        """The key that verifies a token with this header, or None when there is none."""

    async def start(self) -> None: ...


class StaticKey:
    """One key for every token (HS secret or PEM public key)."""

    def __init__(self, key: Any) -> None:
        self._key = key

    async def key_for(self, kid: str | None, alg: str) -> Any:
        return self._key

    async def start(self) -> None:
        return None


class JWKSKeys:
    """Keys from a JWKS URL, cached and refreshed on unknown kid."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        min_refetch: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[bool], None] | None = None,
    ) -> None:
        self._url = url
        self._client = client
        self._min_refetch = min_refetch
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self._on_fetch = on_fetch or (lambda ok: None)

    async def start(self) -> None:
        try:
            await self._fetch()
        except KeyFetchError as exc:
            log.warning("jwks: initial fetch failed, will retry on first token: %s", exc)

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
        if jwk is None or (jwk.algorithm_name and jwk.algorithm_name != alg and "alg" in jwk._jwk_data):
            return None
        return jwk.key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        self._fetched_at = self._clock()
        try:
            response = await self._client.get(self._url, timeout=5.0, follow_redirects=False)
            response.raise_for_status()
            jwks = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError, jwt.InvalidKeyError) as exc:
            self._on_fetch(False)
            raise KeyFetchError(f"{self._url}: {exc.__class__.__name__}") from None
        self._on_fetch(True)
        keys: dict[str | None, jwt.PyJWK] = {}
        for key in jwks.keys:
            if key.public_key_use in (None, "sig"):
                keys[key.key_id] = key
        self._keys = keys
        log.info("jwks: fetched %d keys from %s", len(keys), self._url)


def build_key_source(
    config: TokensConfig, client: httpx.AsyncClient, on_fetch: Callable[[bool], None] | None = None
) -> KeySource:
    """The configured key source; a bad key file is a ConfigError (``config.validate_files`` reports it first)."""
    if config.secret is not None:
        return StaticKey(config.secret.encode())
    if config.public_key_file is not None:
        return StaticKey(load_public_key(config.public_key_file, config.algorithms))
    if config.jwks_url is None:
        # Unreachable: TokensConfig refuses anything but exactly one key source (gateway.config.tokens).
        raise ValueError("TokensConfig without a key source")
    return JWKSKeys(config.jwks_url, client, on_fetch=on_fetch)
