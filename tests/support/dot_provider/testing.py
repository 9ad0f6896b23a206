"""What the test may ask of the provider besides OAuth: expire tokens, take introspection down, read the
token endpoint's calls. One uvicorn process, so module state is the provider's state."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider.models import AccessToken, RefreshToken
from oauth2_provider.oauth2_validators import OAuth2Validator

STATE: dict[str, Any] = {"introspection": "up", "grants": []}


class Validator(OAuth2Validator):
    """ID token and userinfo claims: the username too, whatever the scopes (no consent screen here)."""

    oidc_claim_scope = None

    def get_additional_claims(self, request: Any) -> dict[str, Any]:
        return {"preferred_username": request.user.username, "email": request.user.email}


class TestingMiddleware:
    """Records the grant type of every token-endpoint call; answers 503 at /o/introspect/ when told to."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/o/token/" and request.method == "POST":
            STATE["grants"].append(request.POST.get("grant_type"))
        if request.path == "/o/introspect/" and STATE["introspection"] == "down":
            return JsonResponse({"error": "temporarily_unavailable"}, status=503)
        return self.get_response(request)


@csrf_exempt
def expire(request: HttpRequest) -> JsonResponse:
    """Every access token (of ``username``, when given) expires now: introspection answers active: false."""
    body = json.loads(request.body or b"{}")
    tokens = AccessToken.objects.all()
    if body.get("username"):
        tokens = tokens.filter(user__username=body["username"])
    count = tokens.update(expires=timezone.now() - timedelta(seconds=1))
    return JsonResponse({"expired": count})


@csrf_exempt
def introspection(request: HttpRequest) -> JsonResponse:
    """``{"state": "down"}`` or ``"up"``."""
    STATE["introspection"] = json.loads(request.body)["state"]
    return JsonResponse({"state": STATE["introspection"]})


def stats(request: HttpRequest) -> JsonResponse:
    refresh = RefreshToken.objects
    return JsonResponse(
        {
            "grants": STATE["grants"],
            "refresh_tokens": refresh.count(),
            "revoked_refresh_tokens": refresh.filter(revoked__isnull=False).count(),
            "access_tokens": AccessToken.objects.count(),
        }
    )
