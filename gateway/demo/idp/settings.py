"""How the demo IdP is set up: signing algorithm and keys, client credentials, users, lifetimes, and
the defaults of its run-time ``Behaviour``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.demo.idp.faults import Behaviour, jwk

Algorithm = Literal["HS256", "RS256"]
ClientAuth = Literal["post", "basic", "none", "any"]
SigningKey = str | rsa.RSAPrivateKey


def new_rsa_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA signing key (about 0.1 s of CPU)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class DemoUser(TypedDict):
    """A user the IdP knows: the password and the claims its access tokens carry."""

    password: str
    claims: dict[str, Any]


def _user(password: str, name: str, roles: list[str], is_staff: bool) -> DemoUser:
    email = f"{password}@example.com"
    claims = {"name": name, "email": email, "roles": roles, "is_staff": is_staff, "realm_access": {"roles": roles}}
    return {"password": password, "claims": claims}


def default_users() -> dict[str, DemoUser]:
    """alice (password alice) is an admin and staff; bob (password bob) is a plain user."""
    return {
        "alice": _user("alice", "Alice Admin", ["user", "admin"], True),
        "bob": _user("bob", "Bob User", ["user"], False),
    }


@dataclass
class IdPSettings:
    """How the IdP signs and whom it knows. An RSA key is generated here when RS256 and none is given."""

    issuer: str = "http://127.0.0.1"
    audience: str | None = "legacy-app"
    algorithm: Algorithm = "HS256"
    hs_secret: str = "demo-idp-hs256-secret-0123456789abcdef"
    rsa_key: rsa.RSAPrivateKey | None = None
    kid: str = "demo-key-1"
    access_ttl: int = 300
    refresh_ttl: int = 1209600
    client_id: str = "legacy-app"
    client_secret: str = "demo-secret"
    client_auth: ClientAuth = "any"
    latency: float = 0.0
    users: dict[str, DemoUser] = field(default_factory=default_users)
    # OIDC redirect URIs registered for client_id; empty accepts any loopback http URI (tests, demo).
    redirect_uris: list[str] = field(default_factory=list)
    # Defaults of the run-time ``Behaviour`` (``/_admin/reset`` returns to them).
    reuse_window: float = 0.0
    revoke_used: bool = True
    reuse_revokes_family: bool = True
    clock_skew: float = 0.0

    def __post_init__(self) -> None:
        if self.algorithm == "RS256" and self.rsa_key is None:
            self.rsa_key = new_rsa_key()

    def public_pem(self) -> str:
        """The RSA public key as PEM (what a gateway's ``public_key_file`` holds); RS256 only."""
        if self.rsa_key is None:
            raise ValueError("public_pem() needs algorithm RS256")
        pem = self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode()

    def jwks(self) -> dict[str, Any]:
        """The JWK Set of the initial key, or no keys for HS256 (a shared secret is never published)."""
        return {"keys": [jwk(self.kid, self.rsa_key)] if self.rsa_key else []}

    def behaviour(self) -> Behaviour:
        """The run-time behaviour the IdP starts with (and ``/_admin/reset`` returns to)."""
        return Behaviour(
            latency=self.latency,
            reuse_window=self.reuse_window,
            revoke_used=self.revoke_used,
            reuse_revokes_family=self.reuse_revokes_family,
            clock_skew=self.clock_skew,
        )
