"""What the demo IdP's HTTP parts share: strict request bodies, OAuth errors and the token answer."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


class OAuthError(Exception):
    """An OAuth error answer (RFC 6749 §5.2): ``error`` and the HTTP status."""

    def __init__(self, error: str, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.status = status


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded body; strict like real IdPs (RFC 6749 §3.2: no repeated parameters)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request")
    try:
        pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise OAuthError("invalid_request") from exc
    form = dict(pairs)
    if len(form) != len(pairs):
        raise OAuthError("invalid_request")
    return form


async def read_json(request: Request) -> dict[str, Any]:
    """The JSON object in the body; ``{}`` when there is none or it is not an object."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def oauth_tokens(body: dict[str, Any], expires_in: int) -> Response:
    """A successful token answer (RFC 6749 §5.1): ``body`` plus token_type and expires_in (unless ``body`` has
    its own, spoiled ones), not cached."""
    return JSONResponse({"token_type": "Bearer", "expires_in": expires_in} | body, headers=NO_STORE)


def bad_request(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=400)
