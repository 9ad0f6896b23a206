"""Settings of a Django app behind the gateway: production-like (DEBUG off), identity from X-Auth-User."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ["DJANGO_APP_DIR"])  # a temporary directory of the test's: the sqlite database

SECRET_KEY = "django-app-under-test-not-a-secret-0123456789"
DEBUG = False
# The gateway forwards the browser's Host (127.0.0.1:<gateway port>); ports do not count here.
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "support.django_app.urls"
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # After AuthenticationMiddleware: it replaces request.user with the header's user.
    "support.django_app.auth.GatewayUserMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
AUTHENTICATION_BACKENDS = ["support.django_app.auth.GatewayUserBackend"]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # templates/admin/base_site.html points the admin's "Log out" button at the gateway.
        "DIRS": [HERE / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DATA / "db.sqlite3"}}
STATIC_URL = "/static/"
