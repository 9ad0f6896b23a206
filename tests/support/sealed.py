"""Refresh cookies as the gateway seals them (gateway.sealing), for tests that start from IdP-issued tokens.

A browser only ever holds the refresh cookie the gateway set. A test that takes a session straight
from the IdP (``IdPProcess.issue``) seals its refresh token as a gateway with the same ``store.secret``
would; a value the gateway set already (read back from a ``Set-Cookie``) passes as it is.
"""

from __future__ import annotations

from gateway.sealing import Sealer

STORE_SECRET = "store-secret-for-tests"  # store.secret in most integration configs


def refresh_cookie(value: str, name: str, secret: str = STORE_SECRET) -> str:
    """The refresh cookie's value holding ``value`` (a raw token, or a value the gateway set already)."""
    sealer = Sealer(secret)
    return value if sealer.open_cookie(value, name) is not None else sealer.seal_cookie(value, name)


def refresh_token_in(value: str, name: str, secret: str = STORE_SECRET) -> str | None:
    """The refresh token a cookie value set by the gateway holds; None when it holds none."""
    return Sealer(secret).open_cookie(value, name)
