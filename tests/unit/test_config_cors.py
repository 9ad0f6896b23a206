"""gateway/config/cors.py and the route keys `preflight` / `cors`: bad CORS policies never start, naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.routing import RouteTable

SECRET = "config-cors-secret-0123456789abcdef"


def config(**route: Any) -> dict[str, Any]:
    return {
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "routes": [{"name": "api", "path": "/api/", "upstream": "http://127.0.0.1:9", **route}],
    }


def problems_of(**route: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config(**route))
    return info.value.problems


def test_preflight_upstream_and_cors_together_is_an_error_naming_preflight() -> None:
    assert problems_of(preflight="upstream", cors={"allowed_origins": ["https://spa.example"]}) == [
        "routes[0].preflight: upstream answers preflights, cors has the gateway answer them: pick one"
    ]


def test_preflight_upstream_needs_options_in_methods() -> None:
    assert problems_of(preflight="upstream", methods=["GET", "POST"]) == [
        "routes[0].preflight: upstream forwards OPTIONS: list it in methods"
    ]
    assert problems_of(preflight="skip") == ["routes[0].preflight: Input should be 'authenticate' or 'upstream'"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://spa.example/",
        "https://spa.example/app",
        "https://spa.example?x",
        "spa.example",
        "null",
        "ftp://spa.example",
        "https://user@spa.example",
        "https://spa.example:99999",
    ],
)
def test_allowed_origins_are_exact_origins(origin: str) -> None:
    [problem] = problems_of(cors={"allowed_origins": [origin]})
    assert problem.startswith("routes[0].cors.allowed_origins: ") and repr(origin) in problem


def test_wildcards_with_credentials_are_errors_naming_each_key() -> None:
    cors = {"allowed_origins": ["*"], "allowed_headers": ["*"], "expose_headers": ["*"], "allow_credentials": True}
    assert problems_of(cors=cors) == [
        f'routes[0].cors.{key}: "*" cannot be used with allow_credentials: true'
        for key in ("allowed_origins", "allowed_headers", "expose_headers")
    ]


def test_cors_methods_must_be_the_routes_and_lists_must_be_header_names() -> None:
    cors = {"allowed_origins": ["https://spa.example"], "allowed_methods": ["get", "PURGE"]}
    assert problems_of(methods=["GET", "POST"], cors=cors) == [
        "routes[0].cors.allowed_methods: not in the route's methods: PURGE"
    ]
    bad = {"allowed_origins": ["https://spa.example"], "allowed_headers": ["X Spa"], "max_age": -1}
    assert problems_of(cors=bad) == [
        "routes[0].cors.allowed_headers: not header names: 'X Spa'",
        "routes[0].cors.max_age: Input should be greater than or equal to 0",
    ]
    assert problems_of(cors={"allowed_origins": []})[0].startswith("routes[0].cors.allowed_origins: ")


def test_a_valid_policy_loads_and_shows_in_the_route_table() -> None:
    cors = {"allowed_origins": ["https://spa.example", "http://localhost:3000"], "allow_credentials": True}
    loaded = parse_config(config(cors=cors))
    assert loaded.routes[0].cors is not None and loaded.routes[0].cors.max_age == 600
    assert "cors" in RouteTable.from_config(loaded.routes).describe()[0]
    forwarded = parse_config(config(preflight="upstream"))
    assert "preflight=upstream" in RouteTable.from_config(forwarded.routes).describe()[0]
