"""The control plane of one config generation: every part that talks to the identity provider.

    keys         keys.KeySource                  the access tokens' keys (file, secret, JWKS)
    verifier     tokens.Verifier                 JWTs with those keys, or opaque tokens at the IdP
                 (introspection.build_verifier)  (introspection or userinfo)
    refresher    refresh.SessionRefresher        transparent refresh at refresh.endpoint
    sessions     sessionauth.SessionAuth         server-side sessions (session.mode: server)
    oidc         login.OIDCLogin                 the gateway's own login (login.oidc)
    backchannel  backchannel.BackchannelLogout   logout tokens from the IdP (with login.oidc)

Each uses the generation's control-plane client for its section (``tls.TLSSettings.client``).
"""

from __future__ import annotations

from gateway.backchannel import BackchannelLogout, LogoutTokens
from gateway.config import GatewayConfig
from gateway.cookies import CookieJar
from gateway.endsession import EndSession, IdTokenKeys
from gateway.families import FamilyIndex
from gateway.idp_client import IdPClient
from gateway.introspection import build_verifier
from gateway.keys import build_key_source
from gateway.login import OIDCLogin
from gateway.refresh import SessionRefresher
from gateway.sessionauth import ServerSessionIndex, SessionAuth
from gateway.sessions import ServerSessions
from gateway.shared import Shared
from gateway.tls import TLSSettings


class ControlPlane:
    """The IdP-facing parts of one generation, built from its config; ``None`` where the config has none."""

    def __init__(self, config: GatewayConfig, shared: Shared, tls: TLSSettings, jar: CookieJar) -> None:
        self.keys = build_key_source(config.tokens, tls.client("tokens"), on_fetch=shared.metrics.jwks_fetch)
        # JWTs with the configured keys, or opaque tokens asked about at the IdP.
        self.verifier = build_verifier(
            config.tokens,
            self.keys,
            tls.client,
            token_hash=shared.sealer.token_hash,
            clock=shared.clock,
            denied=shared.denylist,
            on_call=shared.metrics.introspection,
        )
        self.refresher = self._refresher(config, shared, tls, jar)
        self.sessions = self._server_sessions(config, shared)
        self.oidc = self._oidc(config, shared, tls, jar)
        oidc = config.login.oidc
        self.end_session = (
            EndSession(self.oidc, oidc.client_id, shared.families, shared.sealer) if self.oidc and oidc else None
        )
        self.backchannel = self._backchannel(config, shared)

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        """Let the refreshes in flight finish (they hold locks and redeemed tokens); stop the JWKS timer."""
        if self.refresher is not None:
            await self.refresher.close()
        if self.sessions is not None:
            await self.sessions.close()
        await self.keys.close()

    def _refresher(
        self, config: GatewayConfig, shared: Shared, tls: TLSSettings, jar: CookieJar
    ) -> SessionRefresher | None:
        if config.refresh.endpoint is None:
            return None
        return SessionRefresher(
            config=config.refresh,
            store=shared.store,
            sealer=shared.sealer,
            idp=IdPClient(config.refresh, tls.client("refresh")),
            verifier=self.verifier,
            jar=jar,
            metrics=shared.metrics,
            clock=shared.clock,
            denylist=shared.denylist if config.tokens.revoke_superseded else None,
            families=shared.families,
            # A sealed cookie the gateway did not issue never gets this far; raw ones are limited per client.
            throttle=None if config.cookies.refresh.sealed else shared.throttle,
        )

    def _oidc(self, config: GatewayConfig, shared: Shared, tls: TLSSettings, jar: CookieJar) -> OIDCLogin | None:
        if config.login.oidc is None:
            return None
        return OIDCLogin(
            config=config.login.oidc,
            jar=jar,
            http=tls.client("login.oidc"),
            sealer=shared.sealer,
            store=shared.store,
            verifier=self.verifier,
            keys=self.keys if config.tokens.has_keys else None,  # None: the JWKS the discovery document names
            algorithms=config.tokens.algorithms,
            secure=config.cookies.secure,
            clock=shared.clock,
            families=shared.families,
            logout_redirect=config.logout.redirect,
            sessions=self.sessions,
        )

    def _server_sessions(self, config: GatewayConfig, shared: Shared) -> SessionAuth | None:
        """session.mode server: the records in the store, and their requests, logins and logouts."""
        if config.session.mode != "server":
            return None
        store, sealer, denylist = shared.store, shared.sealer, shared.denylist
        return SessionAuth(
            sessions=ServerSessions(config.session, config.cookies, store, sealer, denylist, shared.clock),
            verifier=self.verifier,
            refresher=self.refresher,
            families=shared.families,
            sealer=shared.sealer,
            absolute_timeout=config.session.absolute_timeout,
        )

    def _backchannel(self, config: GatewayConfig, shared: Shared) -> BackchannelLogout | None:
        """``{prefix}/backchannel-logout``, with ``login.oidc`` (its issuer and client id name the logout tokens)."""
        oidc = config.login.oidc
        if oidc is None:
            return None
        tokens = LogoutTokens(
            # Logout tokens are signed like ID tokens: with opaque access tokens, by the discovery's jwks_uri.
            keys=IdTokenKeys(self.oidc) if self.oidc is not None and not config.tokens.has_keys else self.keys,
            algorithms=config.tokens.algorithms,
            issuer=oidc.issuer,
            audience=oidc.client_id,
            store=shared.store,
            sealer=shared.sealer,
            leeway=config.tokens.leeway,
            clock=shared.clock,
        )
        index = ServerSessionIndex(self.sessions) if self.sessions is not None else FamilyIndex(shared.families)
        return BackchannelLogout(tokens, index, shared.sealer)
