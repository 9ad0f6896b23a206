"""Who the user is: the gateway's X-Auth-User header (docs/recipes.md#django)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.backends import RemoteUserBackend
from django.contrib.auth.middleware import RemoteUserMiddleware
from django.http import HttpRequest


class GatewayUserMiddleware(RemoteUserMiddleware):
    """Logs in the user the gateway names; logs out (and switches) when the header changes or goes."""

    header = "HTTP_X_AUTH_USER"
    # Django 5.2's async path reads request.META["HTTP_" + header], i.e. HTTP_HTTP_X_AUTH_USER (tickets
    # #36300, #37079): nobody would be logged in under ASGI. The sync path reads META[header] everywhere.
    async_capable = False


class GatewayUserBackend(RemoteUserBackend):
    """Creates unknown users; staff and superuser when the gateway says the roles include ``admin``.

    ``configure_user`` runs when the middleware logs a user in (the header's user differs from the
    session's), so a role change at the IdP shows here at the next login."""

    def configure_user(self, request: HttpRequest | None, user: Any, created: bool = True) -> Any:
        roles = set(filter(None, (request.META.get("HTTP_X_AUTH_ROLES", "") if request else "").split(",")))
        admin = "admin" in roles
        email = request.META.get("HTTP_X_AUTH_EMAIL", "") if request else ""
        if (user.is_staff, user.is_superuser, user.email) != (admin, admin, email):
            user.is_staff = user.is_superuser = admin
            user.email = email
            user.save(update_fields=["is_staff", "is_superuser", "email"])
        return user
