"""Talking to the identity provider's token endpoint: refresh (two styles) and revocation.

``oauth2``: RFC 6749 §6 form POST ``grant_type=refresh_token`` with client authentication
(``post``, ``basic`` or ``none``). ``json``: Django SimpleJWT style, ``POST {"refresh": ...}``.
Redirects are never followed. Every answer is classified by status and OAuth ``error`` code,
never by message text, and by whether the IdP may have redeemed the token (issue 12, point 2):

- the grant is dead (``invalid_grant``; SimpleJWT's 401 ``token_not_valid``) -> RefreshRejected
- the request never reached the IdP (connect error, pool timeout), or the IdP answered that it
  did not redeem it (500, 503, 429, ``invalid_client`` and other refusals of *us*)
  -> IdPUnavailable: the session is fine, the gateway is not; keep the cookies, answer 503
- the request was sent and the answer is lost or unusable (read timeout, reset, 502 or 504 from
  a proxy in front of the IdP, a 200 that is not JSON) -> IdPAnswerLost; a 200 without usable
  tokens -> BadIdPResponse. The IdP may have redeemed the token: it must never be sent again
  (unless the IdP tolerates reuse for a while, ``refresh.idp_reuse_window``).

Each redemption goes out on a connection of its own (``Connection: close``): a pooled connection
the IdP closed while idle would make "sent, then reset" ambiguous for no reason.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from gateway.config import RefreshConfig
from gateway.errors import BadIdPResponse, IdPAnswerLost, IdPUnavailable, RefreshRejected

log = logging.getLogger("gateway.idp")

# OAuth errors that mean "this refresh token will never work again" (RFC 6749 §5.2).
_DEAD_GRANT = frozenset({"invalid_grant"})
# Statuses a proxy in front of the IdP answers when the IdP's own answer did not reach it.
_ANSWER_LOST = frozenset({502, 504})


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access: str
    refresh: str | None  # None: the IdP did not rotate; keep using the current refresh token
    expires_in: float | None = None


class IdPClient:
    def __init__(self, config: RefreshConfig, client: httpx.AsyncClient) -> None:
        if config.endpoint is None:
            raise ValueError("refresh.endpoint is not configured")
        self._config = config
        self._endpoint = config.endpoint
        self._client = client
        # httpcore (behind httpx's own transport) reports each step through the "trace" extension;
        # other transports (httpx.ASGITransport in tests) do not.
        self._traced = isinstance(getattr(client, "_transport", None), httpx.AsyncHTTPTransport)

    def _client_auth(self) -> tuple[dict[str, str], dict[str, str]]:
        """(form fields, headers) that authenticate the gateway as an OAuth client."""
        c = self._config
        if c.client_id is None or c.client_auth == "none":
            return ({"client_id": c.client_id} if c.client_id else {}), {}
        if c.client_auth == "basic":
            # RFC 6749 §2.3.1: form-urlencode each part before base64.
            raw = f"{quote(c.client_id, safe='')}:{quote(c.client_secret or '', safe='')}".encode()
            return {}, {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        form = {"client_id": c.client_id}
        if c.client_secret is not None:
            form["client_secret"] = c.client_secret
        return form, {}

    async def redeem(
        self, refresh_token: str, *, before_send: Callable[[], Awaitable[None]] | None = None
    ) -> IssuedTokens:
        """Exchange a refresh token; raises RefreshRejected, IdPUnavailable or IdPAnswerLost.

        ``before_send`` runs once connected, right before the request's first byte leaves; what it
        raises propagates, with nothing sent. The whole call is bounded by ``refresh.timeout``,
        connecting included.
        """
        c = self._config
        traced = sent = False

        async def trace(event: str, info: dict[str, Any]) -> None:
            nonlocal traced, sent
            traced = True
            # From the first byte of the request on, the IdP may act on it (httpcore trace events).
            # Not the CONNECT to an HTTPS proxy, which httpcore traces with the same names.
            request = info.get("request")
            if getattr(request, "method", b"") == b"CONNECT":
                return
            if not sent and ".send_request_headers.started" in event:
                if before_send is not None:
                    await before_send()
                sent = True

        if before_send is not None and not self._traced:
            await before_send()  # a transport that reports no progress: record the attempt up front

        options: dict[str, Any] = {
            "timeout": c.timeout,
            "follow_redirects": False,
            "extensions": {"trace": trace},
            "headers": {"Connection": "close"},
        }
        try:
            async with asyncio.timeout(c.timeout):
                if c.style == "json":
                    body = {c.fields.request: refresh_token}
                    response = await self._client.post(self._endpoint, json=body, **options)
                else:
                    form, headers = self._client_auth()
                    form.update(grant_type="refresh_token", refresh_token=refresh_token)
                    options["headers"] |= headers
                    response = await self._client.post(self._endpoint, data=form, **options)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError) as exc:
            raise IdPUnavailable(f"IdP unreachable ({exc.__class__.__name__})") from None
        except (TimeoutError, httpx.HTTPError) as exc:
            # A transport that reports no progress (not httpcore) leaves it unknown: assume it was sent.
            if sent or not traced:
                raise IdPAnswerLost(f"IdP answer lost after sending ({exc.__class__.__name__})") from None
            raise IdPUnavailable(f"IdP unreachable before sending ({exc.__class__.__name__})") from None
        return self._classify(response)

    def _classify(self, response: httpx.Response) -> IssuedTokens:
        status = response.status_code
        body = _json(response)
        if status == 200:
            if body is None:
                raise IdPAnswerLost("IdP answered 200 without JSON")
            return self._tokens(body)
        if status in _ANSWER_LOST:
            # A proxy in front of the IdP gave up waiting or lost the IdP's answer: it may have redeemed.
            raise IdPAnswerLost(f"IdP answer lost in a proxy (status {status})")
        error = body.get("error") if body else None
        code = body.get("code") if body else None
        if error in _DEAD_GRANT:
            raise RefreshRejected(f"IdP rejected the refresh token ({error})")
        if self._config.style == "json" and status == 401 and body is not None and error != "invalid_client":
            # SimpleJWT answers an invalid, expired or blacklisted token with 401 (code token_not_valid).
            # A 400 there means our request was malformed (a misconfigured field name): not the session's fault.
            raise RefreshRejected(f"IdP rejected the refresh token ({code or 'status 401'})")
        detail = f"error={error}" if error else f"status {status}"
        raise IdPUnavailable(f"IdP refused the refresh call: {detail}")

    def _tokens(self, body: dict[str, Any]) -> IssuedTokens:
        c = self._config
        if c.style == "json":
            access_key, refresh_key = c.fields.access, c.fields.refresh
        else:
            access_key, refresh_key = "access_token", "refresh_token"
        access, refresh, expires = body.get(access_key), body.get(refresh_key), body.get("expires_in")
        if not isinstance(access, str) or not access:
            raise BadIdPResponse("IdP answered 200 without an access token")
        if refresh is not None and (not isinstance(refresh, str) or not refresh):
            raise BadIdPResponse("IdP answered 200 with an unusable refresh token")
        return IssuedTokens(access, refresh, _seconds(expires))

    async def revoke(self, token: str, hint: str = "refresh_token") -> bool:
        """RFC 7009 revocation, best effort: True when the IdP accepted it."""
        endpoint = self._config.revocation_endpoint
        if endpoint is None:
            return False
        form, headers = self._client_auth()
        form.update(token=token, token_type_hint=hint)
        try:
            response = await self._client.post(
                endpoint, data=form, headers=headers, timeout=self._config.timeout, follow_redirects=False
            )
        except httpx.HTTPError as exc:
            log.warning("revocation failed: %s", exc.__class__.__name__)
            return False
        if response.status_code != 200:
            log.warning("revocation refused: status %d", response.status_code)
        return response.status_code == 200


def _seconds(value: Any) -> float | None:
    """expires_in as a number; some IdPs send it as a string ("3599")."""
    if isinstance(value, bool):
        return None
    try:
        return float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None


def _json(response: httpx.Response) -> dict[str, Any] | None:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
