"""The gateway's exceptions: one tree, translated from library errors where they enter our code.

GatewayError
├── ConfigError            bad gateway.yaml; carries every problem with its key path
├── StoreError             the store (Redis) is unreachable or answered nonsense
├── KeyFetchError          JWKS could not be fetched and no last good keys exist
└── RefreshError           a refresh did not produce usable tokens
    ├── RefreshRejected    the IdP says the grant is dead (invalid_grant, 401): end the session
    ├── IdPUnavailable     the token was not redeemed (IdP unreachable, 5xx, refused us): 503, retry later
    ├── IdPAnswerLost      the IdP may have redeemed the token, but its answer is lost (timeout or
    │   │                  reset after sending, 502/504, a 200 that is not JSON): never send it again
    │   └── BadIdPResponse a 200 without usable tokens: 502
    ├── LockTimeout        waited too long for another process's refresh: answer 503
    └── RefreshReused      a superseded refresh token came back after the grace period
"""

from __future__ import annotations


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
    """Verification keys could not be fetched and none were cached."""


class RefreshError(GatewayError):
    """Base of refresh failures; ``reason`` is the metric/log outcome code."""

    reason = "refresh_failed"


class RefreshRejected(RefreshError):
    reason = "invalid_grant"


class IdPUnavailable(RefreshError):
    reason = "idp_error"


class IdPAnswerLost(RefreshError):
    reason = "idp_answer_lost"


class BadIdPResponse(IdPAnswerLost):
    reason = "idp_bad_response"


class LockTimeout(RefreshError):
    reason = "lock_timeout"


class RefreshReused(RefreshError):
    reason = "reuse"
