"""Generate the OIDC signing key, migrate, register the gateway's client and a user, serve under uvicorn."""

from __future__ import annotations

import argparse
import os

import django
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.management import call_command

CLIENT_ID = "gateway"
CLIENT_SECRET = "gateway-client-secret"
USERS = {"alice": "alice-password", "bob": "bob-password"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m support.dot_provider")
    parser.add_argument("--port", type=int, required=True)
    # Loopback redirect URIs match on any port (RFC 8252 §7.3): the gateway's port need not be known yet.
    parser.add_argument("--redirect-uri", default="http://127.0.0.1/.gateway/callback")
    args = parser.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    os.environ["DOT_RSA_PRIVATE_KEY"] = pem.decode()
    os.environ["DOT_ISSUER"] = f"http://127.0.0.1:{args.port}/o"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "support.dot_provider.settings")
    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    register(args.redirect_uri)
    uvicorn.run("support.dot_provider.asgi:application", host="127.0.0.1", port=args.port, log_level="warning")


def register(redirect_uri: str) -> None:
    from django.contrib.auth.models import User
    from oauth2_provider.models import Application

    for name, password in USERS.items():
        if not User.objects.filter(username=name).exists():
            User.objects.create_user(name, f"{name}@example.com", password)
    Application.objects.update_or_create(
        client_id=CLIENT_ID,
        defaults={
            "name": "gateway",
            "client_secret": CLIENT_SECRET,
            "client_type": Application.CLIENT_CONFIDENTIAL,
            "authorization_grant_type": Application.GRANT_AUTHORIZATION_CODE,
            "redirect_uris": redirect_uri,
            "skip_authorization": True,
            "algorithm": Application.RS256_ALGORITHM,
        },
    )


if __name__ == "__main__":
    main()
