"""The end of an OIDC session at the provider, and the provider's ID-token keys for what else it signs.

EndSession    RP-initiated logout (OIDC RP-Initiated Logout 1.0 §2): the IdP's ``end_session_endpoint``
              with ``client_id``, ``post_logout_redirect_uri`` and the session's ID token as
              ``id_token_hint`` (in a URL, as the spec has it); read before the session ends
IdTokenKeys   the keys ID tokens verify with (those of ``tokens``, or with opaque access tokens the
              discovery's ``jwks_uri``), for logout tokens (gateway.backchannel), which are signed alike
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from gateway.errors import KeyFetchError, LoginFailed, StoreError
from gateway.families import Families
from gateway.login import OIDCLogin
from gateway.sealing import Sealer

log = logging.getLogger("gateway.login")


class EndSession:
    """RP-initiated logout for one ``login.oidc``."""

    def __init__(self, login: OIDCLogin, client_id: str, families: Families | None, sealer: Sealer) -> None:
        self._login = login
        self._client_id = client_id
        self._families = families
        self._sealer = sealer

    async def url(self, refresh_token: str | None, id_token: str | None = None) -> str | None:
        """The IdP's end-session URL with the session's ID token as ``id_token_hint`` (``id_token``, else the one kept
        for the session of ``refresh_token``), or None when the IdP advertises no ``end_session_endpoint``. Never
        raises: a logout must not fail on the IdP's discovery."""
        try:
            endpoint = (await self._login.discover()).get("end_session_endpoint")
            if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
                return None
            params = {"client_id": self._client_id, "post_logout_redirect_uri": self._login.after_logout}
            hint = id_token if id_token is not None else await self.id_token_of(refresh_token)
            if hint is not None:
                params["id_token_hint"] = hint
        except Exception:  # noqa: BLE001 - LoginFailed, and anything else the discovery may throw
            log.warning("logout: no RP-initiated logout (the IdP's discovery failed); the local logout stands")
            return None
        return f"{endpoint}{'&' if urlsplit(endpoint).query else '?'}{urlencode(params)}"

    async def id_token_of(self, refresh_token: str | None) -> str | None:
        """The ID token kept for the cookie session of ``refresh_token`` (read before the session ends), or None.
        Never raises."""
        if refresh_token is None or self._families is None:
            return None
        try:
            root = await self._families.root_of(self._sealer.token_hash(refresh_token))
            return await self._families.index.id_token(root) if root else None
        except StoreError:
            return None


class IdTokenKeys:
    """The provider's ID-token keys as a ``keys.KeySource``."""

    def __init__(self, login: OIDCLogin) -> None:
        self._login = login

    async def key_for(self, kid: str | None, alg: str) -> Any:
        try:
            keys = await self._login.id_token_keys()
        except LoginFailed:
            raise KeyFetchError("the provider's discovery document names no usable jwks_uri") from None
        return await keys.key_for(kid, alg)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def on_change(self, listener: Callable[[], None]) -> None:
        return None
