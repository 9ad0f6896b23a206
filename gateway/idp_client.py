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
  a proxy in front of the IdP, a 200 that is not JSON) -> IdPAnswerLost; a 200 the gateway cannot
  use -> BadIdPResponse: no access token, a body over 64 KiB (never read further), a
  ``token_type`` other than Bearer (a DPoP-bound token would not work as a cookie), an
  ``expires_in`` that is not a positive number, or a ``scope`` wider than the replaced access
  token's (RFC 6749 §6: a refresh never widens the grant). The IdP may have redeemed the token:
  it must never be sent again (unless the IdP tolerates reuse for a while,
  ``refresh.idp_reuse_window``).

Each redemption goes out on a connection of its own (``Connection: close``): a pooled connection
the IdP closed while idle would make "sent, then reset" ambiguous for no reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from gateway.config import RefreshConfig
from gateway.errors import BadIdPResponse, IdPAnswerLost, IdPUnavailable, RefreshRejected
from gateway.tls import tls_failure

log = logging.getLogger("gateway.idp")

# OAuth errors that mean "this refresh token will never work again" (RFC 6749 §5.2).
_DEAD_GRANT = frozenset({"invalid_grant"})
# Statuses a proxy in front of the IdP answers when the IdP's own answer did not reach it.
_ANSWER_LOST = frozenset({502, 504})
# A token answer is a few KB; a bigger body is not one, and is never read past this.
MAX_ANSWER_BYTES = 64 * 1024


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
        self,
        refresh_token: str,
        *,
        before_send: Callable[[], Awaitable[None]] | None = None,
        granted: frozenset[str] | None = None,
    ) -> IssuedTokens:
        """Exchange a refresh token; raises RefreshRejected, IdPUnavailable or IdPAnswerLost.

        ``before_send`` runs once connected, right before the request's first byte leaves; what it
        raises propagates, with nothing sent. The whole call is bounded by ``refresh.timeout``,
        connecting included, and so is reading the answer. ``granted``: the scope of the access
        token being replaced, when known; an answer with a wider ``scope`` is refused.
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

        options = self._request(refresh_token) | {"extensions": {"trace": trace}}
        try:
            async with asyncio.timeout(c.timeout), self._client.stream("POST", self._endpoint, **options) as response:
                body = await _read_capped(response)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError) as exc:
            raise IdPUnavailable(
                f"IdP unreachable ({tls_failure(self._endpoint, exc) or exc.__class__.__name__})"
            ) from None
        except (TimeoutError, httpx.HTTPError) as exc:
            # A transport that reports no progress (not httpcore) leaves it unknown: assume it was sent.
            if sent or not traced:
                raise IdPAnswerLost(f"IdP answer lost after sending ({exc.__class__.__name__})") from None
            raise IdPUnavailable(f"IdP unreachable before sending ({exc.__class__.__name__})") from None
        if response.status_code == 200 and body is None:
            raise BadIdPResponse(f"IdP answered 200 with a body over {MAX_ANSWER_BYTES} bytes")
        return self._classify(response, _json(response, body), granted)

    def _request(self, refresh_token: str) -> dict[str, Any]:
        """The options of the redemption request: its body, client authentication and headers."""
        c = self._config
        # A connection of its own; no compression, so the size cap counts what the IdP sent.
        headers = {"Connection": "close", "Accept-Encoding": "identity"}
        options: dict[str, Any] = {"timeout": c.timeout, "follow_redirects": False}
        if c.style == "json":
            return options | {"json": {c.fields.request: refresh_token}, "headers": headers}
        form, auth = self._client_auth()
        form.update(grant_type="refresh_token", refresh_token=refresh_token)
        return options | {"data": form, "headers": headers | auth}

    def _classify(
        self, response: httpx.Response, body: dict[str, Any] | None, granted: frozenset[str] | None
    ) -> IssuedTokens:
        status = response.status_code
        if status == 200:
            if body is None:
                raise IdPAnswerLost("IdP answered 200 without JSON")
            return self._tokens(body, granted)
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

    def _tokens(self, body: dict[str, Any], granted: frozenset[str] | None) -> IssuedTokens:
        c = self._config
        if c.style == "json":
            access_key, refresh_key = c.fields.access, c.fields.refresh
        else:
            access_key, refresh_key = "access_token", "refresh_token"
        access, refresh, kind = body.get(access_key), body.get(refresh_key), body.get("token_type")
        if not isinstance(access, str) or not access:
            raise BadIdPResponse("IdP answered 200 without an access token")
        if refresh is not None and (not isinstance(refresh, str) or not refresh):
            raise BadIdPResponse("IdP answered 200 with an unusable refresh token")
        if kind is not None and (not isinstance(kind, str) or kind.lower() != "bearer"):
            # RFC 6749 §7.1: a DPoP (RFC 9449) or other bound token is useless to a cookie session.
            raise BadIdPResponse("IdP answered 200 with a token_type other than Bearer")
        scope = body.get("scope")
        answered = _scope_set(scope)
        if granted and scope is not None and (answered is None or not answered <= granted):
            # Checked only when the replaced token named its scopes; an unreadable scope counts as wider.
            raise BadIdPResponse("IdP answered 200 with a scope wider than the replaced access token's")
        return IssuedTokens(access, refresh, _lifetime(body.get("expires_in")))

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


def scopes_of(claims: dict[str, Any]) -> frozenset[str] | None:
    """The scopes a token grants: its ``scope`` (RFC 8693 §4.2, space-separated) or ``scp`` (a list or a string).

    None when it names none (absent, empty or not readable): then nothing is compared with it.
    """
    return _scope_set(claims.get("scope", claims.get("scp"))) or None


def _scope_set(value: Any) -> frozenset[str] | None:
    """Scopes as a set: from a space-separated string (RFC 6749 §3.3) or a list of strings; None otherwise."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    return None


def _lifetime(value: Any) -> float | None:
    """``expires_in``: a positive number (some IdPs send it as a string, "3599"); None when absent."""
    if value is None:
        return None
    seconds = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except ValueError:
            pass
    if not (math.isfinite(seconds) and seconds > 0):
        raise BadIdPResponse("IdP answered 200 with an expires_in that is not a positive number")
    return seconds


async def _read_capped(response: httpx.Response, limit: int = MAX_ANSWER_BYTES) -> bytes | None:
    """The answer's body, or None (read no further) once it is over ``limit`` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _json(response: httpx.Response, body: bytes | None) -> dict[str, Any] | None:
    if body is None or "json" not in response.headers.get("content-type", ""):
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        return None
    return data if isinstance(data, dict) else None
