"""The gateway's exceptions: one tree, translated from library errors where they enter our code.

GatewayError
├── ConfigError            bad gateway.yaml; carries every problem with its key path
├── StoreError             the store (Redis) is unreachable or answered nonsense
├── KeyFetchError          JWKS could not be fetched and the cached keys lack the one asked for
├── IntrospectionFailed    an opaque token's introspection or userinfo endpoint cannot tell: 503
├── BadPath                the request path is ambiguous or malformed: 400 (also a ValueError)
├── BadHeader              a header value that is not UTF-8 cannot go upstream unchanged: 400
├── UnsafeClaim            a claim for an identity header holds CR, LF or NUL: 403 (also a ValueError)
├── CookieTooLarge         a token does not fit in a cookie (4 KB): 502 (also a ValueError)
├── UpstreamFailure        the upstream refused, reset or did not answer in time: 502 / 504
├── ClientGone             the client disconnected while its request body was being forwarded
├── BodyTooLarge           the client's request body grew past its route's max_body: 413
├── LoginFailed            the OIDC login cannot go on: its status and reason code
└── RefreshError           a refresh did not produce usable tokens
    ├── RefreshRejected    the IdP says the grant is dead (invalid_grant, 401): end the session
    ├── IdPUnavailable     the token was not redeemed (IdP unreachable, 5xx, refused us): 503, retry later
    └── IdPAnswerLost      the IdP may have redeemed the token, but its answer is lost (timeout or
        │                  reset after sending, 502/504, a 200 that is not JSON): never send it again
        └── BadIdPResponse a 200 without usable tokens: 502

Library errors (httpx, redis, PyJWT, aiohttp) are translated where they enter: store.connections,
idp_client, keys, tokens and introspection (to a ``Verdict``, never raised) and forwarder.
"""

from __future__ import annotations

from gateway.reasons import Reason


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is unusable; ``problems`` lists each as ``key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class StoreError(GatewayError):
    """The shared store could not be reached or answered unexpectedly."""


class KeyFetchError(GatewayError):
    """Verification keys could not be fetched, and the key asked for is not among the cached ones."""


class IntrospectionFailed(GatewayError):
    """The introspection or userinfo endpoint is down, slow, refused the gateway or answered garbage."""


class BadPath(GatewayError, ValueError):
    """The request path is ambiguous or malformed; answer 400."""


class BadHeader(GatewayError, ValueError):
    """A request header whose value cannot be forwarded byte for byte (not UTF-8); the message names it."""


class UnsafeClaim(GatewayError, ValueError):
    """A claim value that cannot go into a header (CR, LF, NUL); the message names the claim."""


class CookieTooLarge(GatewayError, ValueError):
    """A token too large for a cookie: the browser would drop it silently."""


class UpstreamFailure(GatewayError):
    """The upstream could not be reached or did not answer in time; ``timeout`` tells which, ``detail`` (when
    known) what went wrong, e.g. TLS verification."""

    def __init__(self, timeout: bool, detail: str | None = None) -> None:
        self.timeout = timeout
        super().__init__(detail or ("upstream timed out" if timeout else "upstream refused or reset the connection"))


class ClientGone(GatewayError):
    """The client disconnected while its request body was being forwarded."""


class BodyTooLarge(GatewayError):
    """The client's request body grew past its route's ``max_body`` while being forwarded."""


class LoginFailed(GatewayError):
    """The OIDC login cannot go on: answered ``status`` with ``{"error": "login_failed", "reason": ...}``."""

    def __init__(self, status: int, reason: Reason) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class RefreshError(GatewayError):
    """Base of refresh failures; ``reason`` is the outcome code."""

    reason = Reason.REFRESH_ERROR


class RefreshRejected(RefreshError):
    reason = Reason.INVALID_GRANT


class IdPUnavailable(RefreshError):
    reason = Reason.IDP_ERROR


class IdPAnswerLost(RefreshError):
    reason = Reason.IDP_ANSWER_LOST


class BadIdPResponse(IdPAnswerLost):
    reason = Reason.IDP_BAD_RESPONSE
