"""The `tls` keys (gateway/config/tls.py, checks.tls_context): rules at load time, files at check time."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.config import ConfigError, parse_config, tls_context, validate_files

SECRET = "s" * 40


def _config(tls: dict[str, Any] | None = None, upstream: str = "https://127.0.0.1:9443", **more: Any) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "app", "path": "/", "upstream": upstream}
    if tls is not None:
        route["tls"] = tls
    return {
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "routes": [{"name": "assets", "path": "/static/", "upstream": "http://127.0.0.1:9000"}, route],
        **more,
    }


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    return caught.value.problems


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate it signed, a client certificate and key, and an unrelated key."""
    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    client = ca.issue_cert("gateway.test")
    other = trustme.CA().issue_cert("other.test")
    files = {
        "ca": where / "ca.pem",
        "cert": where / "client.pem",
        "key": where / "client.key",
        "other_key": where / "other.key",
        "both": where / "both.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(files["both"]))
    return files


def test_a_key_file_without_its_certificate_is_named() -> None:
    assert _problems(_config({"key_file": "/etc/gw/client.key"})) == [
        "routes[1].tls.key_file: needs cert_file (the certificate this key belongs to)"
    ]


def test_tls_on_a_plain_http_upstream_is_an_error_naming_the_route() -> None:
    problems = _problems(_config({"ca_file": "/ca.pem"}, upstream="http://127.0.0.1:9000"))
    assert problems == [
        "routes[1].tls: upstream is http://, where TLS settings do not apply; use https:// or remove tls"
    ]


def test_verify_false_with_a_ca_file_and_a_bad_server_name_are_refused() -> None:
    problems = _problems(_config({"ca_file": "/ca.pem", "verify": False, "server_name": "https://up.test:443"}))
    assert problems == [
        "routes[1].tls.ca_file: has no effect with verify: false; remove one of them",
        "routes[1].tls.server_name: 'https://up.test:443' is not a host name (no scheme, port or path)",
    ]


def test_control_plane_tls_needs_an_https_url_to_apply_to() -> None:
    data = _config()
    data["tokens"] = {"algorithms": ["HS256"], "secret": SECRET, "tls": {"verify": False}}
    data["refresh"] = {"endpoint": "http://idp.test/token", "tls": {"verify": False}}
    assert _problems(data) == [
        "refresh.tls: endpoint is http://, where TLS settings do not apply; use https:// or remove tls",
        "tokens.tls: applies to jwks_url only; remove it or set jwks_url",
    ]


def test_unknown_keys_under_tls_are_errors() -> None:
    assert _problems(_config({"ca": "/ca.pem"})) == ["routes[1].tls.ca: unknown key"]


def test_loading_reads_no_file_but_check_names_each_unreadable_one(tmp_path: Path) -> None:
    tls = {"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k")}
    config = parse_config(_config(tls), env={})  # no I/O besides gateway.yaml
    assert validate_files(config) == [
        f"routes[1].tls.ca_file: cannot read {tmp_path / 'ca.pem'} (No such file or directory)",
        f"routes[1].tls.cert_file: cannot read {tmp_path / 'c.pem'} (No such file or directory)",
        f"routes[1].tls.key_file: cannot read {tmp_path / 'k'} (No such file or directory)",
    ]


def test_files_that_are_not_pem_are_named(tmp_path: Path, pki: dict[str, Path]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    config = parse_config(_config({"ca_file": str(junk), "cert_file": str(junk), "key_file": str(pki["key"])}), env={})
    ca_problem, cert_problem = validate_files(config)
    assert ca_problem.startswith(f"routes[1].tls.ca_file: {junk} holds no PEM CA certificate (")
    assert cert_problem.startswith(f"routes[1].tls.cert_file: {junk} is not a PEM certificate with the key in ")


def test_a_key_of_another_certificate_is_named(pki: dict[str, Path]) -> None:
    config = parse_config(_config({"cert_file": str(pki["cert"]), "key_file": str(pki["other_key"])}), env={})
    assert validate_files(config) == [
        f"routes[1].tls.key_file: {pki['other_key']} is not the private key of {pki['cert']}"
    ]


def test_control_plane_files_are_checked_too(tmp_path: Path) -> None:
    data = _config()
    data["tokens"] = {"algorithms": ["RS256"], "jwks_url": "https://idp.test/jwks", "tls": {"ca_file": "/nope.pem"}}
    assert validate_files(parse_config(data, env={})) == [
        "tokens.tls.ca_file: cannot read /nope.pem (No such file or directory)"
    ]


def test_good_files_make_a_context_that_verifies_with_the_private_ca_only(pki: dict[str, Path]) -> None:
    tls = {"ca_file": str(pki["ca"]), "cert_file": str(pki["cert"]), "key_file": str(pki["key"])}
    config = parse_config(_config(tls), env={})
    assert validate_files(config) == []
    route = config.routes[1].tls
    assert route is not None
    context = tls_context("routes[1].tls", route)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # the private CA replaces the system's


def test_a_certificate_file_may_hold_its_key(pki: dict[str, Path]) -> None:
    config = parse_config(_config({"cert_file": str(pki["both"])}), env={})
    assert validate_files(config) == []
    alone = parse_config(_config({"cert_file": str(pki["cert"])}), env={})
    (problem,) = validate_files(alone)
    assert problem.startswith(
        f"routes[1].tls.cert_file: {pki['cert']} is not a PEM certificate holding its private key"
    )


def test_verify_false_checks_nothing() -> None:
    config = parse_config(_config({"verify": False}), env={})
    route = config.routes[1].tls
    assert route is not None
    context = tls_context("routes[1].tls", route)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_gateway_check_exits_1_naming_the_unreadable_ca_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config({"ca_file": str(tmp_path / "missing-ca.pem")})))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"routes[1].tls.ca_file: cannot read {tmp_path / 'missing-ca.pem'}" in result.stderr


def test_opaque_token_endpoints_take_tls_and_check_its_files() -> None:
    data = _config()
    data["tokens"] = {"userinfo": {"endpoint": "http://idp.test/userinfo", "tls": {"verify": False}}}
    assert _problems(data) == [
        "tokens.userinfo.tls: endpoint is http://, where TLS settings do not apply; use https:// or remove tls"
    ]
    data["tokens"] = {"introspection": {"endpoint": "https://idp.test/i", "client_id": "gw", "tls": {"ca_file": "/no"}}}
    assert validate_files(parse_config(data, env={})) == [
        "tokens.introspection.tls.ca_file: cannot read /no (No such file or directory)"
    ]
