"""The OIDC callback's ``state`` in the store (gateway.login): one callback's at a time, never twice.

    oidc:{h(state)}   a random value of the callback that holds it, for the flow cookie's lifetime

A callback takes the state before it sends the code and keeps it: a replay, or a copy of the
callback sent while the first is on its way (a double navigation), is refused without reaching the
IdP, whose code reuse detection may revoke what the first one got (RFC 6749 §4.1.2). A 503 before
the code could leave (the store or the IdP unreachable) gives the state back (only if it holds the
callback's own value: a copy that failed to take it never frees it while another's code is on its way),
so that the browser's retry of the same callback completes the login. The value is the callback's own,
so that redis-py's resend of a SET NX that landed (after a connection reset) finds it instead of taking it for a replay.
"""

from __future__ import annotations

import logging
import secrets

from gateway.errors import LoginFailed, StoreError
from gateway.reasons import Reason
from gateway.sealing import Sealer
from gateway.store import Store

log = logging.getLogger("gateway.login")

STATE_LIFETIME = 600  # seconds: the flow cookie's, and so the state's


class LoginRetry(LoginFailed):
    """A 503 before the code could reach the IdP: the same callback may be sent again."""


class States:
    """Login states taken and given back in the store; see the module docstring."""

    def __init__(self, store: Store, sealer: Sealer) -> None:
        self._store = store
        self._sealer = sealer

    async def take(self, state: str) -> str:
        """Hold ``state`` for this callback: its mark, for ``give_back``. Raises LoginFailed (replayed) or LoginRetry
        (the store unreachable)."""
        key, mine = self._key(state), secrets.token_hex(16)
        try:
            taken = await self._store.set_if_absent(key, mine.encode(), STATE_LIFETIME) or (
                await self._store.get(key) == mine.encode()
            )
        except StoreError as exc:
            log.error("login: store unavailable (%s)", exc)
            await self.give_back(state, mine)  # in case it landed: the browser's retry takes it again
            raise LoginRetry(503, Reason.STORE_UNAVAILABLE) from None
        if not taken:
            raise LoginFailed(400, Reason.LOGIN_STATE_REPLAYED)
        return mine

    async def give_back(self, state: str, mine: str) -> bool:
        """Let the same callback take ``state`` again (its code never left), only if it holds this callback's mark
        ``mine``: a copy that failed to take it never frees it for a third while another's code is on its way.
        False when the store did not answer."""
        try:
            await self._store.release(self._key(state), mine)
        except StoreError:
            return False
        return True

    def _key(self, state: str) -> str:
        return f"oidc:{{{self._sealer.token_hash(state)}}}"
