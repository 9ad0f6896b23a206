"""The demo identity provider (the test IdP of the demo and the test suite), as a package.

``python -m gateway.demo.idp`` serves it; ``create_idp_app`` builds it as an ASGI app.
"""

from gateway.demo.idp.faults import CONSUMING_FAILURES, FAILURES, Behaviour
from gateway.demo.idp.oidc import OIDCProvider
from gateway.demo.idp.provider import IdentityProvider, TokenPair, create_idp_app
from gateway.demo.idp.settings import IdPSettings

__all__ = [
    "CONSUMING_FAILURES",
    "FAILURES",
    "Behaviour",
    "IdPSettings",
    "IdentityProvider",
    "OIDCProvider",
    "TokenPair",
    "create_idp_app",
]
