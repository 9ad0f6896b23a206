"""The admin site, and /whoami: what the app was told about the user (the test's view of the headers)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import path


def whoami(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            # Every META key an identity header could land in, however the client spelled it.
            "meta": {key: value for key, value in request.META.items() if "AUTH" in key},
            "user": request.user.get_username() if request.user.is_authenticated else None,
        }
    )


urlpatterns = [
    path("admin/", admin.site.urls),
    path("whoami", whoami),
]
