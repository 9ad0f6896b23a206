"""docs/recipes.md: its gateway.yaml fragments are valid config; its Django recipe is what the browser suite runs."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config

ROOT = Path(__file__).resolve().parents[2]  # tests/unit/ -> the checkout
PAGE = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
DJANGO_APP = ROOT / "tests" / "support" / "django_app"
FRAGMENTS = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", PAGE, re.DOTALL)]
BASE: dict[str, Any] = {
    "tokens": {"algorithms": ["HS256"], "secret": "x" * 32},
    "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9000"}],
}


def test_the_page_has_its_fragments() -> None:
    assert len(FRAGMENTS) >= 2


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda f: ",".join(f))
def test_every_fragment_is_valid_config_that_strips_what_it_maps(fragment: dict[str, Any]) -> None:
    config = parse_config({**BASE, **fragment})
    headers = config.identity.headers
    assert headers["X-Auth-User"] != "sub", "the recipes map the user name from a name claim"
    for name in headers:  # every mapped header is also under a strip_inbound pattern, as the page advises
        assert any(fnmatch.fnmatch(name.lower(), p.lower()) for p in config.identity.strip_inbound), name


def test_the_django_recipe_is_what_the_browser_suite_runs() -> None:
    auth = (DJANGO_APP / "auth.py").read_text(encoding="utf-8")
    template = (DJANGO_APP / "templates" / "admin" / "base_site.html").read_text(encoding="utf-8")
    for line in ['header = "HTTP_X_AUTH_USER"', "async_capable = False", "class GatewayUserBackend(RemoteUserBackend)"]:
        assert line in auth and line in PAGE, line
    for line in ['<form id="logout-form" method="post" action="/.gateway/logout">', "{% block userlinks %}"]:
        assert line in template and line in PAGE, line
