"""config/gateway.schema.json and config/examples/ stay in step with the models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema  # a test dependency (pyproject.toml, [test]): this test always runs
import pytest
import yaml
from support.examples import ENV, EXAMPLES, LOADABLE

from gateway.config import GatewayConfig, parse_config
from gateway.errors import ConfigError
from gateway.schema import build_schema

ROOT = Path(__file__).resolve().parents[2]  # tests/unit/ -> the checkout
SCHEMA_FILE = ROOT / "config" / "gateway.schema.json"
SECRET_KEYS = {"secret", "client_secret"}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _parse(path: Path, env: dict[str, str] = ENV) -> GatewayConfig:
    return parse_config(_load(path), env=env)


def test_schema_file_is_current() -> None:
    stored = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert stored == build_schema(), "config/gateway.schema.json is stale: run scripts/schema"


def test_schema_forbids_unknown_keys_everywhere() -> None:
    schema = build_schema()
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object" and "properties" in definition:
            assert definition.get("additionalProperties") is False, name
    assert set(schema["required"]) == {"tokens", "routes"}
    assert "${VAR}" in schema["description"]


def test_there_is_an_example_per_provider() -> None:
    assert {p.stem for p in EXAMPLES} >= {"keycloak", "auth0", "simplejwt", "oidc"}


# Examples waiting for keys of other branches (support.examples.PENDING) are checked in test_examples.py.
@pytest.mark.parametrize("path", [ROOT / "gateway.yaml", *LOADABLE], ids=lambda p: p.name)
def test_config_loads_with_the_real_loader(path: Path) -> None:
    config = _parse(path)
    assert config.routes


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_takes_secrets_from_the_environment(path: Path) -> None:
    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif key.rsplit(".", 1)[-1] in SECRET_KEYS and node is not None:
            assert re.fullmatch(r"\$\{[A-Z_]+\}", str(node)), f"{path.name} {key}: use ${{ENV}} for secrets"

    walk(_load(path), "")
    with pytest.raises(ConfigError) as info:
        _parse(path, env={})
    assert any("REDIS_URL is not set" in p for p in info.value.problems)


def test_keycloak_example() -> None:
    config = _parse(ROOT / "config" / "examples" / "keycloak.yaml")
    realm = "https://keycloak.example/realms/main"
    assert config.tokens.algorithms == ("RS256",)
    assert config.tokens.jwks_url == f"{realm}/protocol/openid-connect/certs"
    assert config.tokens.issuer == realm
    assert config.refresh.style == "oauth2"
    assert config.refresh.endpoint == f"{realm}/protocol/openid-connect/token"
    assert config.refresh.revocation_endpoint == f"{realm}/protocol/openid-connect/revoke"
    assert config.login.oidc is not None and config.login.oidc.issuer == realm
    assert config.identity.headers == {
        "X-Auth-User": "preferred_username",
        "X-Auth-Email": "email",
        "X-Auth-Roles": "realm_access.roles",
    }
    assert config.store.url.startswith("redis://")


def test_auth0_example() -> None:
    config = _parse(ROOT / "config" / "examples" / "auth0.yaml")
    assert config.tokens.algorithms == ("RS256",)
    assert config.tokens.jwks_url == "https://TENANT.auth0.com/.well-known/jwks.json"
    assert config.tokens.audience == "https://api.example.com"
    assert config.refresh.style == "oauth2"
    assert config.refresh.client_auth == "post"
    assert config.refresh.client_secret == ENV["CLIENT_SECRET"]
    assert config.logout.redirect.endswith("client_id=legacy-app&returnTo=https%3A%2F%2Fapp.example%2F")


def test_simplejwt_example() -> None:
    config = _parse(ROOT / "config" / "examples" / "simplejwt.yaml")
    assert config.tokens.algorithms == ("HS256",)
    assert config.tokens.secret == ENV["JWT_SIGNING_KEY"]
    assert config.refresh.style == "json"
    assert config.refresh.endpoint == "http://django:8000/api/token/refresh/"
    assert config.refresh.grace_period > 0
    assert config.identity.headers["X-Auth-User"] == "user_id"
    (token,) = [r for r in config.routes if r.capture is not None]
    assert token.path == "/api/token/" and token.auth == "none"


def test_generic_oidc_example() -> None:
    config = _parse(ROOT / "config" / "examples" / "oidc.yaml")
    assert config.tokens.jwks_url and config.login.oidc is not None
    assert config.login.oidc.issuer == config.tokens.issuer
    assert "openid" in config.login.oidc.scopes


def test_examples_validate_against_the_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    for path in [ROOT / "gateway.yaml", *LOADABLE]:
        # The schema describes the config after ${VAR} expansion.
        expanded = parse_config(_load(path), env=ENV).model_dump(mode="json", exclude_unset=True)
        jsonschema.validate(expanded, schema)


def test_readme_points_to_the_generated_config_reference() -> None:
    # Key by key, the reference is docs/configuration.md (generated from the models: tests/test_reference.py).
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/configuration.md)" in readme


def test_django_oauth_toolkit_example_uses_introspection() -> None:
    config = _parse(ROOT / "config" / "examples" / "django-oauth-toolkit.yaml")
    assert config.tokens.introspection is not None and config.tokens.jwks_url  # the ID token's keys
    assert config.identity.headers["X-Auth-User"] == "username" and "username" in config.tokens.required_claims
    assert config.login.oidc is not None and "offline_access" not in config.login.oidc.scopes
