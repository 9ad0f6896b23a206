"""The demo IdP as an ASGI app: the one module that puts the token logic and the OIDC part together."""

from __future__ import annotations

from starlette.applications import Starlette

from gateway.demo.idp.admin import AdminEndpoints
from gateway.demo.idp.endpoints import TokenEndpoints
from gateway.demo.idp.logout import LogoutEndpoints
from gateway.demo.idp.oidc import OIDCProvider
from gateway.demo.idp.provider import IdentityProvider
from gateway.demo.idp.settings import IdPSettings


def create_idp_app(settings: IdPSettings) -> Starlette:
    """The IdP as an ASGI app; its state is ``app.state.idp`` (an ``IdentityProvider``) and ``app.state.oidc``
    (an ``OIDCProvider``, whose code exchange answers ``grant_type=authorization_code`` at ``/token``)."""
    idp = IdentityProvider(settings)
    oidc = OIDCProvider(idp)
    tokens = TokenEndpoints(idp, code_grant=oidc.exchange)
    logout = LogoutEndpoints(idp, oidc.redirect_allowed)
    app = Starlette(routes=[*tokens.routes(), *AdminEndpoints(idp).routes(), *oidc.routes(), *logout.routes()])
    app.state.idp, app.state.oidc = idp, oidc
    return app
