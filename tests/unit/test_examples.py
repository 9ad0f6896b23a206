"""config/examples/: every example passes `gateway check`, or fails only for keys another branch is adding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.examples import ENV, EXAMPLES, LOADABLE, PENDING

from gateway.config import load_config, validate_files, workers_problems
from gateway.errors import ConfigError
from gateway.routing import RouteTable

# Issue 16, item 7: an example for each of these, with its quirks written next to it.
PROVIDERS = {"entra", "google", "okta", "dex", "django-oauth-toolkit"}


class PendingKeys(Exception):
    """The example failed only because this version lacks keys another branch adds (support.examples.PENDING)."""


def check_problems(path: Path) -> list[str]:
    """What `gateway check --config path` (and `serve --workers 4`) would report, in-process."""
    try:
        config = load_config(path, env=ENV)
    except ConfigError as exc:
        return exc.problems
    problems = validate_files(config) + workers_problems(config, 4)
    if not problems:
        assert RouteTable.from_config(config.routes).describe()  # the route table check prints
    return problems


def _marks(path: Path) -> list[pytest.MarkDecorator]:
    keys = PENDING.get(path.name)
    if keys is None:
        return []
    waiting = ", ".join(f"{key} (issue 16, branch {branch})" for key, branch in keys.items())
    return [pytest.mark.xfail(strict=True, raises=PendingKeys, reason=f"needs {waiting}")]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=_marks(p)) for p in EXAMPLES])
def test_example_passes_gateway_check(path: Path) -> None:
    problems = check_problems(path)
    waiting = {f"{key}: unknown key" for key in PENDING.get(path.name, {})}
    if waiting and set(problems) == waiting:
        # Only the keys still to come are refused: expected. Anything else (a typo, a key that landed in
        # another shape) fails the test outright: PendingKeys is the only failure the xfail accepts.
        raise PendingKeys(", ".join(problems))
    assert problems == []


def test_there_is_an_example_per_provider() -> None:
    assert {p.stem for p in EXAMPLES} >= PROVIDERS


def test_the_pending_table_names_existing_examples_only() -> None:
    assert set(PENDING) <= {p.name for p in EXAMPLES}


def test_every_pending_example_says_which_key_it_waits_for() -> None:
    for name, keys in PENDING.items():
        text = (EXAMPLES[0].parent / name).read_text(encoding="utf-8")
        for key in keys:
            assert f"Needs `{key}" in text, f"{name}: say in its header that it needs {key}"


@pytest.mark.parametrize("path", LOADABLE, ids=lambda p: p.name)
def test_gateway_check_itself_accepts_it(path: Path) -> None:
    env = {**os.environ, **ENV}
    env.pop("GATEWAY_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    assert f"{path}: ok" in done.stdout.decode()


def _raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES[0].parent / name).read_text(encoding="utf-8"))
    return data


def test_google_and_django_oauth_toolkit_are_not_asked_for_offline_access() -> None:
    # Both refuse the scope (invalid_scope), and the login would fail.
    for name in ("google.yaml", "django-oauth-toolkit.yaml"):
        assert "offline_access" not in _raw(name)["login"]["oidc"]["scopes"], name


def test_the_login_issuer_is_the_access_tokens_issuer_where_both_are_set() -> None:
    for path in EXAMPLES:
        data = _raw(path.name)
        issuer, oidc = data["tokens"].get("issuer"), (data.get("login") or {}).get("oidc")
        if issuer and oidc:
            assert oidc["issuer"] == issuer, path.name
