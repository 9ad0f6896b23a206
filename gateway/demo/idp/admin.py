"""The demo IdP's ``/_admin/*`` endpoints, for tests and tools: count calls, read the redemption
ledger and the families, change the run-time behaviour (inject failures, see ``faults``), roll the
signing key over and mint sessions."""

from __future__ import annotations

import dataclasses

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.demo.idp.common import bad_request, read_json
from gateway.demo.idp.provider import IdentityProvider


class AdminEndpoints:
    """``/_admin/*`` over an ``IdentityProvider``."""

    def __init__(self, idp: IdentityProvider) -> None:
        self.idp = idp

    def routes(self) -> list[Route]:
        return [
            Route("/_admin/stats", self.stats, methods=["GET"]),
            Route("/_admin/behaviour", self.behaviour, methods=["POST"]),
            Route("/_admin/reset", self.reset, methods=["POST"]),
            Route("/_admin/issue", self.issue, methods=["POST"]),
            Route("/_admin/ledger", self.ledger, methods=["GET"]),
            Route("/_admin/families", self.families, methods=["GET"]),
            Route("/_admin/rotate_key", self.rotate_key, methods=["POST"]),
        ]

    async def stats(self, request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(self.idp.counters))

    async def behaviour(self, request: Request) -> Response:
        error = self.idp.behaviour.update(await read_json(request))
        if error is not None:
            return bad_request(error)
        return JSONResponse(dataclasses.asdict(self.idp.behaviour))

    async def reset(self, request: Request) -> Response:
        """Zero the counters, clear the ledger and return to the start-up behaviour (keys and families stay)."""
        self.idp.reset()
        return JSONResponse({"ok": True})

    async def ledger(self, request: Request) -> Response:
        return JSONResponse({"entries": list(self.idp.ledger.entries)})

    async def families(self, request: Request) -> Response:
        return JSONResponse({"families": [family.summary() for family in self.idp.families.values()]})

    async def rotate_key(self, request: Request) -> Response:
        """``{"drop_old": bool}``: a new signing key and kid; answers ``{"kid", "published"}``."""
        drop_old = (await read_json(request)).get("drop_old", False)
        if not isinstance(drop_old, bool):
            return bad_request("drop_old must be a boolean")
        if self.idp.settings.algorithm != "RS256":
            return bad_request("key rollover needs algorithm RS256")
        kid = await self.idp.rotate_key(drop_old)
        return JSONResponse({"kid": kid, "published": self.idp.keyring.published})

    async def issue(self, request: Request) -> Response:
        """``{"username", "access_ttl", "claims"}``: a new session, as if the user had logged in."""
        body = await read_json(request)
        username, ttl, claims = body.get("username"), body.get("access_ttl"), body.get("claims") or {}
        if not isinstance(username, str) or not (ttl is None or isinstance(ttl, int)) or not isinstance(claims, dict):
            return JSONResponse({"error": "need username (str), access_ttl (int|null), claims (object)"}, 400)
        pair = self.idp.start_session(username, claims, ttl)
        return JSONResponse({"access": pair.access, "refresh": pair.refresh})
