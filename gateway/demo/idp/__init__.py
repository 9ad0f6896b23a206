"""A strict identity provider that rotates refresh tokens and detects their reuse: the test IdP of
``gateway demo`` and the test suite. ``python -m gateway.demo.idp --port N`` serves it; ``create_idp_app``
builds it as an ASGI app.

It speaks two dialects: OAuth 2.0 (RFC 6749 ``POST /token``, RFC 7009 ``POST /revoke``) and Django
SimpleJWT (``POST /api/token/``, ``POST /api/token/refresh/``), and is an OpenID Connect provider
(discovery, code + PKCE login). Every refresh token may be redeemed once; presenting a redeemed one
revokes its whole family (RFC 9700 §4.14.2) unless a reuse window allows it for a while.
``/_admin/*`` lets tests count calls, read the redemption ledger, inject failures (before or after
redeeming), roll the signing key over, skew the clock and mint sessions. State lives in memory.

Modules: ``settings`` (IdPSettings, the demo users), ``provider`` (families, rotation, reuse
detection, the ledger; no HTTP), ``faults`` (run-time behaviour, injected failures, keyring, ledger),
``common`` (form parsing, OAuth errors, the token answer), ``endpoints`` (token, revocation, SimpleJWT,
JWKS), ``admin`` (``/_admin/*``), ``oidc`` and ``pages`` (the authorization code flow), and ``app``,
the only one that brings the token endpoints and OIDC together.
"""

from gateway.demo.idp.app import create_idp_app
from gateway.demo.idp.faults import CONSUMING_FAILURES, FAILURES, Behaviour
from gateway.demo.idp.provider import Family, IdentityProvider, TokenPair
from gateway.demo.idp.settings import DemoUser, IdPSettings, default_users

__all__ = [
    "CONSUMING_FAILURES",
    "FAILURES",
    "Behaviour",
    "DemoUser",
    "Family",
    "IdPSettings",
    "IdentityProvider",
    "TokenPair",
    "create_idp_app",
    "default_users",
]
