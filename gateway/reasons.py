"""Every reason code the gateway gives: the ``reason`` of a refusal's JSON body, the access log's
``outcome``, the ``reason`` label of ``gateway_denials_total`` and of refresh outcomes.

Codes are part of the user-facing contract (docs/responses.md): clients and dashboards match on
them, so a code is never renamed. ``responses.STATUS`` maps each to its HTTP status.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class Reason(StrEnum):
    # The request itself
    BAD_PATH = "bad_path"
    NO_ROUTE = "no_route"
    CSRF = "csrf"
    MALFORMED_AUTHORIZATION = "malformed_authorization"
    INVALID_REQUEST = "invalid_request"  # two Authorization headers (RFC 6750 §3.1)
    BAD_HOST = "bad_host"
    BAD_HEADER = "bad_header"  # a header value that is not UTF-8: it cannot be forwarded unchanged
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"  # over the route's max_body
    UNSUPPORTED_CODING = "unsupported_coding"  # a request body's transfer coding besides chunked (RFC 9112 §6.1)
    UNTRUSTED_PROXY = "untrusted_proxy"  # forward-auth headers from a peer not in server.trusted_proxies
    PROXY_MODE_ONLY = "proxy_mode_only"  # forward-auth asked about a capture route: only proxy mode can capture
    CORS_ORIGIN = "cors_origin"  # a preflight from an origin the route's cors does not allow
    # The connection (gateway.limits: answered by the HTTP server, before the app)
    HEADERS_TOO_LARGE = "headers_too_large"
    TOO_MANY_HEADERS = "too_many_headers"
    HEADER_TIMEOUT = "header_timeout"
    CONNECTION_LIMIT = "connection_limit"
    # The access token (tokens.Verifier)
    NO_TOKEN = "no_token"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_REVOKED = "token_revoked"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    TOKEN_TOO_LARGE = "token_too_large"
    MALFORMED_TOKEN = "malformed_token"
    INVALID_TOKEN = "invalid_token"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    KEYS_UNAVAILABLE = "keys_unavailable"  # unknown kid while the JWKS cannot be fetched: 503, cookies kept
    # opaque tokens: the introspection or userinfo endpoint is down, refuses the gateway or answers garbage
    INTROSPECTION_UNAVAILABLE = "introspection_unavailable"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNSUPPORTED_CRIT = "unsupported_crit"
    WRONG_TOKEN_TYPE = "wrong_token_type"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    MISSING_CLAIM = "missing_claim"
    # Authorisation (identity)
    CLAIMS_DENIED = "claims_denied"
    CLAIM_UNSAFE = "claim_unsafe"
    # The session: refresh and its end (refresh, redemption, families)
    INVALID_GRANT = "invalid_grant"
    REUSE = "reuse"
    REFRESH_LOST = "refresh_lost"
    SESSION_ENDED = "session_ended"
    IDP_ERROR = "idp_error"
    IDP_ANSWER_LOST = "idp_answer_lost"
    IDP_BAD_RESPONSE = "idp_bad_response"
    IDP_TOKEN_UNVERIFIED = "idp_token_unverified"
    LOCK_TIMEOUT = "lock_timeout"
    STORE_UNAVAILABLE = "store_unavailable"
    REFRESH_ERROR = "refresh_error"
    REFRESH_RATE_LIMITED = "refresh_rate_limited"  # raw refresh cookies: too many never-seen tokens from one client
    # Token capture on a login route
    CAPTURE_FAILED = "capture_failed"  # a 2xx login answer the gateway cannot read: never passed on
    CAPTURE_TOO_LARGE = "capture_too_large"
    COOKIE_TOO_LARGE = "cookie_too_large"
    # The upstream
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    WEBSOCKET_LIMIT = "websocket_limit"
    # OIDC login ({"error": "login_failed", "reason": ...})
    LOGIN_REFUSED = "login_refused"
    LOGIN_STATE_MISSING = "login_state_missing"
    LOGIN_STATE_INVALID = "login_state_invalid"
    LOGIN_STATE_EXPIRED = "login_state_expired"
    LOGIN_STATE_REPLAYED = "login_state_replayed"
    CODE_EXCHANGE_FAILED = "code_exchange_failed"
    ID_TOKEN_INVALID = "id_token_invalid"


# Codes of the OIDC login's own failures ({"error": "login_failed", "reason": ...}, gateway.login).
LOGIN_FAILURES = frozenset(
    {
        Reason.LOGIN_REFUSED,
        Reason.LOGIN_STATE_MISSING,
        Reason.LOGIN_STATE_INVALID,
        Reason.LOGIN_STATE_EXPIRED,
        Reason.LOGIN_STATE_REPLAYED,
        Reason.CODE_EXCHANGE_FAILED,
        Reason.ID_TOKEN_INVALID,
    }
)

# The session is over: both cookies are cleared, and the family is refused everywhere.
FATAL = frozenset({Reason.INVALID_GRANT, Reason.REUSE, Reason.REFRESH_LOST, Reason.SESSION_ENDED})

# Verification failures of a token the IdP just issued that may pass a moment later: a new kid
# (not yet in the JWKS, or while the JWKS cannot be fetched), an IdP clock ahead of ours, a worker that could not
# load the denylist yet (gateway.tokens.denial).
TRANSIENT = frozenset(
    {
        Reason.UNKNOWN_KEY,
        Reason.KEYS_UNAVAILABLE,
        Reason.TOKEN_NOT_YET_VALID,
        Reason.INTROSPECTION_UNAVAILABLE,
        Reason.STORE_UNAVAILABLE,
    }
)

# A refresh that produced tokens: new ones, a grace hit on a successor shared by another request,
# or a successor whose access token verified only on a second look, or not yet.
Refreshed = Literal["ok", "grace_hit", "reverified", "unverified"]


def as_reason(value: str) -> Reason | None:
    """The code ``value`` names (read back from the store), or None if it is not one."""
    try:
        return Reason(value)
    except ValueError:
        return None


def ended_label(reason: str) -> Reason:
    """The outcome for a family that ended for ``reason`` (as stored; unknown ones read as a logout)."""
    code = as_reason(reason)
    return code if code in FATAL and code is not None else Reason.SESSION_ENDED
