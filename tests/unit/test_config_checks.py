"""gateway.config.checks: rules beyond the file itself, as `gateway check`, `serve` and reloads apply them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.app import create_app
from gateway.config import (
    GatewayConfig,
    key_weakness,
    parse_config,
    reload_problems,
    validate_files,
    workers_problems,
)
from gateway.errors import ConfigError

SECRET = "s" * 40


def _config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9000"}],
    }
    data.update(overrides)
    return data


def _with_key_file(path: Path) -> GatewayConfig:
    return parse_config(_config(tokens={"algorithms": ["RS256"], "public_key_file": str(path)}), env={})


def _public_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_missing_key_file_loads_but_validate_files_names_it(tmp_path: Path) -> None:
    config = _with_key_file(tmp_path / "missing.pem")  # loading does no I/O besides gateway.yaml
    (problem,) = validate_files(config)
    assert problem.startswith("tokens.public_key_file: cannot read") and "missing.pem" in problem


def test_a_key_file_without_a_public_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(b"not a key")
    assert validate_files(_with_key_file(path)) == [f"tokens.public_key_file: {path} is not a public key for RS256"]


def test_a_good_key_file_and_configs_without_one_have_no_problems(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(_public_pem())
    assert validate_files(_with_key_file(path)) == []
    assert validate_files(parse_config(_config(), env={})) == []


def test_workers_rule_needs_several_workers_memory_and_refresh() -> None:
    refresh = parse_config(_config(refresh={"endpoint": "http://127.0.0.1:9/token"}), env={})
    assert workers_problems(refresh, 3) == [
        "store.url: memory:// serves one process; use redis:// to run --workers 3 with refresh"
    ]
    assert workers_problems(refresh, 1) == []
    assert workers_problems(parse_config(_config(), env={}), 3) == []


def test_server_side_sessions_need_a_shared_store_for_several_workers_and_a_secret_for_redis() -> None:
    server = parse_config(_config(session={"mode": "server"}), env={})
    assert workers_problems(server, 2) == [
        "store.url: memory:// serves one process; use redis:// to run --workers 2 with session.mode: server"
    ]
    assert workers_problems(server, 1) == []
    with pytest.raises(ConfigError, match="store.secret"):
        parse_config(_config(session={"mode": "server"}, store={"url": "redis://127.0.0.1:6379/0"}), env={})
    with pytest.raises(ConfigError, match="session.idle_timeout"):
        parse_config(_config(session={"mode": "server", "idle_timeout": 100, "absolute_timeout": 50}), env={})
    with pytest.raises(ConfigError, match="session.mode"):
        parse_config(_config(session={"mode": "servers"}), env={})


def test_reload_refuses_a_new_store_or_address_and_nothing_else() -> None:
    running = parse_config(_config(), env={})
    assert reload_problems(running, parse_config(_config(logout={"redirect": "/bye"}), env={})) == []
    moved = parse_config(_config(store={"key_prefix": "other:"}, server={"port": 9999}), env={})
    assert reload_problems(running, moved) == [
        "store: changing the store needs a restart",
        "server.host/server.port: changing the listening address needs a restart",
    ]


async def test_a_reload_reports_every_problem_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reload path asks the same rules: a new store and an unreadable key file are both refused."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config()))
    gateway = create_app(parse_config(_config(), env={}), config_path=str(path))
    changed = _config(store={"key_prefix": "other:"})
    changed["tokens"] = {"algorithms": ["RS256"], "public_key_file": str(tmp_path / "missing.pem")}
    path.write_text(yaml.safe_dump(changed))
    assert await gateway.reload("test") is False
    assert gateway.generation == 1 and gateway.config.tokens.secret == SECRET
    assert "store: changing the store needs a restart" in caplog.text
    assert "tokens.public_key_file: cannot read" in caplog.text


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_check_reports_a_bad_key_file_without_building_the_app(tmp_path: Path) -> None:
    """`gateway check` validates the config and the files it names; it does not assemble a gateway."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config(tokens={"algorithms": ["RS256"], "public_key_file": str(tmp_path / "k")})))
    code = (
        "import sys\nfrom gateway.cli import main\n"
        f"status = main(['check', '--config', {str(path)!r}])\n"
        "print('app built' if 'gateway.app' in sys.modules else 'app not built')\n"
        "sys.exit(status)\n"
    )
    result = _run(code)
    assert result.returncode == 1, result.stderr
    assert "tokens.public_key_file: cannot read" in result.stderr and "Traceback" not in result.stderr
    assert "app not built" in result.stdout
    (tmp_path / "k").write_bytes(_public_pem())
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "app not built" in result.stdout and "routes (in match order):" in result.stdout


def _weak_pem(curve: ec.EllipticCurve | None = None) -> bytes:
    key = ec.generate_private_key(curve) if curve else rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_weak_key_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    """Regression (issue 14, item 12): a 1024-bit RSA verification key was accepted at start."""
    path = tmp_path / "weak.pem"
    path.write_bytes(_weak_pem())
    assert validate_files(_with_key_file(path)) == [
        f"tokens.public_key_file: {path} holds a 1024-bit RSA key; at least 2048 bits are required"
    ]
    path.write_bytes(_weak_pem(ec.SECP192R1()))
    es256 = parse_config(_config(tokens={"algorithms": ["ES256"], "public_key_file": str(path)}), env={})
    (problem,) = validate_files(es256)  # PyJWT >= 2.10 refuses the curve for ES256 itself; older ones did not
    assert problem.startswith(f"tokens.public_key_file: {path} ")


def test_key_weakness_names_short_rsa_keys_and_small_curves() -> None:
    assert key_weakness(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()) is None
    assert key_weakness(ec.generate_private_key(ec.SECP256R1()).public_key()) is None
    assert "secp192r1" in (key_weakness(ec.generate_private_key(ec.SECP192R1()).public_key()) or "")


@pytest.mark.parametrize("command", ["check", "serve"])
def test_gateway_refuses_to_start_with_a_1024_bit_rsa_key(tmp_path: Path, command: str) -> None:
    """Regression (issue 14, item 12): `gateway serve` started with a 1024-bit RSA key; now it exits 1 naming it."""
    key = tmp_path / "idp-1024.pem"
    key.write_bytes(_weak_pem())
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config(tokens={"algorithms": ["RS256"], "public_key_file": str(key)})))
    port = ["--port", "1"] if command == "serve" else []  # never bound: the config is refused first
    result = subprocess.run(
        [sys.executable, "-m", "gateway", command, "--config", str(path), *port],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"tokens.public_key_file: {key} holds a 1024-bit RSA key" in result.stderr
    assert "Traceback" not in result.stderr


def test_reload_refuses_new_limits() -> None:
    """The HTTP server took them at start: a reload that changes them is refused, not half applied."""
    running = parse_config(_config(), env={})
    tighter = parse_config(_config(server={"limits": {"header_count": 50}}), env={})
    assert reload_problems(running, tighter) == [
        "server.limits: the HTTP server's limits are set at start; changing them needs a restart"
    ]


@pytest.mark.parametrize("choice", ["lean", "aiohttp", "httpx"])
def test_gateway_check_takes_either_forwarder_and_names_the_key_otherwise(tmp_path: Path, choice: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config(server={"forwarder": choice})))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    if choice == "httpx":
        assert result.returncode == 1 and "server.forwarder" in result.stderr and "Traceback" not in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_the_forwarder_is_lean_unless_aiohttp_is_chosen_and_a_reload_cannot_change_it() -> None:
    from gateway.forwarder import AiohttpForwarder
    from gateway.upstream_h1 import LeanForwarder

    lean = parse_config(_config(), env={})
    reference = parse_config(_config(server={"forwarder": "aiohttp"}), env={})
    assert isinstance(create_app(lean).shared.forwarder, LeanForwarder)
    assert isinstance(create_app(reference).shared.forwarder, AiohttpForwarder)
    assert reload_problems(lean, reference) == [
        "server.forwarder: the forwarding client is chosen at start; changing it needs a restart"
    ]
