"""Pieces of gateway.yaml for integration tests against the demo IdP (``support.servers.start_idp``), where the
same client (``legacy-app`` / ``demo-secret``) logs in, refreshes and verifies in many test modules."""

from __future__ import annotations

from typing import Any

from support.servers import IdPProcess

CLIENT_ID, CLIENT_SECRET = "legacy-app", "demo-secret"  # the demo IdP's registered client


def rs256_tokens(idp: IdPProcess, **extra: Any) -> dict[str, Any]:
    """``tokens``: the demo IdP's RS256 access tokens, keys from its JWKS."""
    return {"algorithms": ["RS256"], "jwks_url": f"{idp.url}/jwks", "issuer": idp.url, **extra}


def demo_refresh(idp: IdPProcess, **extra: Any) -> dict[str, Any]:
    """``refresh``: the demo IdP's token endpoint, as its client."""
    return {"endpoint": f"{idp.url}/token", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **extra}


def oidc_login(idp: IdPProcess, port: int, **extra: Any) -> dict[str, Any]:
    """``login``: the gateway's own OIDC login at the demo IdP, its callback on the gateway's ``port``."""
    oidc = {
        "issuer": idp.url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_url": f"http://127.0.0.1:{port}/.gateway/callback",
    }
    return {"oidc": oidc | extra}
