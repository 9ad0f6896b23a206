"""DOT's endpoints under /o/, Django's login page, and the test's controls under /_test/."""

from __future__ import annotations

from django.contrib.auth.views import LoginView
from django.urls import include, path

from support.dot_provider import testing

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("accounts/login/", LoginView.as_view()),
    path("_test/expire", testing.expire),
    path("_test/introspection", testing.introspection),
    path("_test/stats", testing.stats),
]
