"""gateway.config: strict loading of gateway.yaml, and `gateway check` on good and bad files."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from gateway.config import GatewayConfig, load_config, parse_config
from gateway.errors import ConfigError

SECRET = "s" * 40

FULL_YAML = """
server:
  host: 0.0.0.0
  port: 9090
  prefix: /.gw/
  trusted_proxies: [10.0.0.0/8, 192.168.1.1]
store:
  url: "redis://127.0.0.1:6379/0"
  key_prefix: "gwx:"
  secret: ${GATEWAY_SECRET}
tokens:
  algorithms: [HS256]
  secret: ${JWT_SECRET}
  issuer: https://idp.example/realms/main
  audience: legacy-app
  leeway: 10
  refresh_before: 20
refresh:
  endpoint: https://idp.example/token
  style: json
  client_id: legacy-app
  client_secret: ${CLIENT_SECRET:-dev-secret}
  client_auth: basic
  fields: {request: refresh, access: access, refresh: refresh}
  revocation_endpoint: null
  timeout: 5
  grace_period: 30
cookies:
  access:  {name: gw_access}
  refresh: {name: gw_refresh, max_age: 1209600}
  secure: true
  same_site: strict
identity:
  headers: {X-Auth-User: sub, X-Auth-Email: email, X-Auth-Roles: realm_access.roles}
  strip_inbound: ["X-Auth-*"]
  forward_token: true
login:
  url: https://idp.example/login?next={next}
  oidc:
    issuer: https://idp.example/realms/main
    client_id: legacy-app
    client_secret: ${CLIENT_SECRET:-dev-secret}
    scopes: [openid, offline_access]
    redirect_url: https://app.example/.gateway/callback
logout: {redirect: /bye}
csrf:   {allowed_origins: [https://other.example]}
routes:
  - {name: assets, path: /static/, upstream: "http://127.0.0.1:9000", auth: none}
  - {name: admin,  path: /admin/,  upstream: "http://127.0.0.1:9000/", require: {claims: {is_staff: true}}}
  - {name: login,  path: /api/token/, upstream: "http://127.0.0.1:9000", auth: none,
     capture: {access: access, refresh: refresh}}
  - {name: app,    path: /,        upstream: "https://app.internal:8443/base", auth: required,
     timeout: {connect: 2, read: 30}}
"""

ENV = {"GATEWAY_SECRET": "g" * 32, "JWT_SECRET": SECRET}


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9000"}],
    }
    data.update(overrides)
    return data


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={} if env is None else env)
    return info.value.problems


def has(problems: list[str], prefix: str, fragment: str = "") -> bool:
    return any(p.startswith(prefix) and fragment in p for p in problems)


# --- a good config ---


def test_full_config_loads_every_documented_key(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(FULL_YAML)
    config = load_config(path, env=ENV)
    assert config.server.port == 9090 and config.server.host == "0.0.0.0"
    assert config.server.prefix == "/.gw"  # trailing slash trimmed
    assert config.server.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")
    assert config.store.secret == "g" * 32 and config.store.key_prefix == "gwx:"
    assert config.tokens.secret == SECRET and config.tokens.algorithms == ("HS256",)
    assert config.tokens.issuer == "https://idp.example/realms/main" and config.tokens.audience == "legacy-app"
    assert (config.tokens.leeway, config.tokens.refresh_before) == (10, 20)
    assert config.refresh.style == "json" and config.refresh.client_auth == "basic"
    assert config.refresh.client_secret == "dev-secret"  # ${CLIENT_SECRET:-dev-secret}, unset
    assert config.cookies.same_site == "strict" and config.cookies.refresh.max_age == 1209600
    assert config.identity.headers["X-Auth-Roles"] == "realm_access.roles" and config.identity.forward_token
    assert config.login.oidc is not None and config.login.oidc.scopes == ("openid", "offline_access")
    assert config.logout.redirect == "/bye" and config.csrf.allowed_origins == ("https://other.example",)
    names = [r.name for r in config.routes]
    assert names == ["assets", "admin", "login", "app"]
    admin, login, app = config.routes[1], config.routes[2], config.routes[3]
    assert admin.upstream == "http://127.0.0.1:9000" and admin.auth == "required"
    assert admin.require is not None and admin.require.claims == {"is_staff": True}
    assert login.capture is not None and login.capture.refresh == "refresh"
    assert (app.timeout.connect, app.timeout.read) == (2, 30)
    assert app.upstream == "https://app.internal:8443/base"


def test_defaults_filled_for_omitted_sections() -> None:
    config = parse_config(minimal(), env={})
    assert config.server.prefix == "/.gateway" and config.server.port == 8080
    assert config.server.trusted_proxies == ()  # trust no proxy unless configured
    assert config.store.url == "memory://"
    assert config.tokens.leeway == 30 and config.tokens.refresh_before == 30
    assert config.cookies.access.name == "gw_access" and config.cookies.secure is True
    assert config.identity.strip_inbound == ("X-Auth-*",) and config.identity.forward_token is False
    assert config.routes[0].auth == "required"
    assert (config.routes[0].timeout.connect, config.routes[0].timeout.read) == (5, 60)


def test_config_objects_are_frozen() -> None:
    config = parse_config(minimal(), env={})
    assert isinstance(config, GatewayConfig)
    with pytest.raises(pydantic.ValidationError):
        config.tokens.leeway = 999  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.routes[0].upstream = "http://evil"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.routes.append(config.routes[0])  # type: ignore[attr-defined]


# --- unknown keys ---


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (lambda d: d.update(bogus=1), "bogus: unknown key"),
        (lambda d: d.update(server={"bogus": 1}), "server.bogus: unknown key"),
        (lambda d: d.update(cookies={"access": {"name": "a", "nmae": "b"}}), "cookies.access.nmae: unknown key"),
        (lambda d: d["routes"].append({"name": "b", "path": "/b", "upsteam": "http://x"}), "routes[1].upsteam"),
        (lambda d: d["routes"][0].update(timeout={"conect": 1}), "routes[0].timeout.conect: unknown key"),
        (lambda d: d["tokens"].update(algorithm=["HS256"]), "tokens.algorithm: unknown key"),
    ],
)
def test_unknown_keys_are_errors_naming_their_path(patch: Any, expected: str) -> None:
    data = minimal()
    patch(data)
    problems = problems_of(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_typo_in_route_key_reports_both_the_unknown_and_the_missing_key() -> None:
    data = minimal()
    data["routes"].append({"name": "b", "path": "/b", "upsteam": "http://x"})
    problems = problems_of(data)
    assert has(problems, "routes[1].upsteam", "unknown key")
    assert has(problems, "routes[1].upstream")


# --- ${VAR} interpolation ---


def test_var_and_default_interpolation() -> None:
    data = minimal(store={"secret": "${S}", "key_prefix": "${P:-gw:}", "url": "redis://${HOST:-localhost}:6379/0"})
    config = parse_config(data, env={"S": "from-env", "HOST": "redis.internal"})
    assert config.store.secret == "from-env"
    assert config.store.key_prefix == "gw:"
    assert config.store.url == "redis://redis.internal:6379/0"


def test_interpolation_inside_lists_and_routes() -> None:
    data = minimal()
    data["routes"][0]["upstream"] = "http://${UP_HOST}:${UP_PORT:-9000}"
    config = parse_config(data, env={"UP_HOST": "app.internal"})
    assert config.routes[0].upstream == "http://app.internal:9000"


def test_empty_variable_falls_back_to_default_like_sh() -> None:
    """Regression: ${VAR:-default} must use the default when VAR is set but empty (POSIX sh, compose)."""
    config = parse_config(minimal(store={"key_prefix": "${P:-gw:}"}), env={"P": ""})
    assert config.store.key_prefix == "gw:"


def test_missing_variable_is_an_error_naming_the_key_and_the_variable() -> None:
    data = minimal(store={"secret": "${GATEWAY_SECRET}"})
    data["tokens"]["secret"] = "${JWT_SECRET}"
    problems = problems_of(data, env={})
    assert has(problems, "store.secret", "GATEWAY_SECRET")
    assert has(problems, "tokens.secret", "JWT_SECRET")


def test_os_environ_used_when_no_env_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_SECRET", "x" * 33)
    data = minimal()
    data["tokens"]["secret"] = "${GW_TEST_SECRET}"
    assert parse_config(data).tokens.secret == "x" * 33


# --- refusals (issue 2, item 2) ---


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_refused(alg: str) -> None:
    data = minimal()
    data["tokens"]["algorithms"] = ["HS256", alg]
    assert has(problems_of(data), "tokens.algorithms", "never accepted")


def test_hs_mixed_with_rs_refused() -> None:
    data = minimal(tokens={"algorithms": ["HS256", "RS256"], "secret": SECRET})
    assert has(problems_of(data), "tokens.algorithms", "mixed")


def test_short_hs_secret_refused() -> None:
    data = minimal(tokens={"algorithms": ["HS256"], "secret": "s" * 31})
    assert has(problems_of(data), "tokens.secret", "32 bytes")
    parse_config(minimal(tokens={"algorithms": ["HS256"], "secret": "s" * 32}), env={})


def test_hs512_secret_must_be_as_long_as_its_hash() -> None:
    """Regression: RFC 7518 §3.2 (key >= hash size); PyJWT warns on every verify with a shorter HS512 key."""
    data = minimal(tokens={"algorithms": ["HS512"], "secret": "s" * 40})
    assert has(problems_of(data), "tokens.secret", "64 bytes")
    parse_config(minimal(tokens={"algorithms": ["HS512"], "secret": "s" * 64}), env={})


def test_secret_with_asymmetric_algorithm_refused() -> None:
    data = minimal(tokens={"algorithms": ["RS256"], "secret": SECRET})
    assert has(problems_of(data), "tokens.secret", "HS*")


def test_leeway_over_300_refused() -> None:
    data = minimal()
    data["tokens"]["leeway"] = 301
    assert has(problems_of(data), "tokens.leeway", "300")
    data["tokens"]["leeway"] = 300
    assert parse_config(data, env={}).tokens.leeway == 300


def test_required_claims_default_to_exp_and_sub_and_always_include_exp() -> None:
    assert parse_config(minimal(), env={}).tokens.required_claims == ("exp", "sub")
    data = minimal()
    data["tokens"]["required_claims"] = ["sub"]
    assert has(problems_of(data), "tokens.required_claims", "exp")
    data["tokens"]["required_claims"] = ["exp", ""]
    assert has(problems_of(data), "tokens.required_claims", "non-empty")
    data["tokens"]["required_claims"] = ["exp", "sub", "email"]
    assert parse_config(data, env={}).tokens.required_claims == ("exp", "sub", "email")


def test_route_without_upstream_refused() -> None:
    data = minimal(routes=[{"name": "app", "path": "/"}])
    assert has(problems_of(data), "routes[0].upstream")


@pytest.mark.parametrize("upstream", ["ftp://127.0.0.1", "file:///etc/passwd", "127.0.0.1:9000", "http://", "x"])
def test_non_http_upstream_refused(upstream: str) -> None:
    data = minimal(routes=[{"name": "app", "path": "/", "upstream": upstream}])
    assert has(problems_of(data), "routes[0].upstream", "http(s)")


def test_duplicate_route_names_refused() -> None:
    data = minimal()
    data["routes"] = [
        {"name": "app", "path": "/", "upstream": "http://a"},
        {"name": "api", "path": "/api", "upstream": "http://a"},
        {"name": "app", "path": "/x", "upstream": "http://a"},
    ]
    assert has(problems_of(data), "routes[2].name", "duplicate")


def test_unknown_auth_refused() -> None:
    data = minimal(routes=[{"name": "app", "path": "/", "upstream": "http://a", "auth": "maybe"}])
    assert has(problems_of(data), "routes[0].auth")


def test_no_key_source_and_no_routes_refused() -> None:
    problems = problems_of({"tokens": {"algorithms": ["RS256"]}, "routes": []})
    assert has(problems, "tokens.secret", "exactly one")
    assert has(problems, "routes", "at least one")


def test_every_problem_reported_at_once() -> None:
    data = minimal(server={"bogus": 1}, store={"secret": "${NOPE}"})
    data["tokens"] = {"algorithms": ["HS256", "none"], "secret": "short", "leeway": 900}
    data["routes"] = [
        {"name": "app", "path": "/", "upstream": "ftp://a"},
        {"name": "app", "path": "/b", "upstream": "http://b", "auth": "sometimes"},
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    problems = info.value.problems
    for prefix in (
        "server.bogus",
        "store.secret",
        "tokens.algorithms",
        "tokens.leeway",
        "routes[0].upstream",
        "routes[1].auth",
    ):
        assert has(problems, prefix), (prefix, problems)
    assert str(info.value).count("\n") == len(problems) - 1  # the message lists them all


# --- files ---


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"server: {host: \xff\xfe}\n")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("text", ["server: [unclosed\n", "a: b: c\n", "\tserver: 1\n", "key: 'open\n"])
def test_broken_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "YAML" in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


# --- gateway check ---


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _good_yaml() -> str:
    data = yaml.safe_load(FULL_YAML)
    data["tokens"]["secret"] = SECRET
    data["store"] = {"url": "memory://", "secret": "g" * 32}
    return yaml.safe_dump(data)


def test_check_good_config_prints_route_table(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(_good_yaml())
    result = _check(path)
    assert result.returncode == 0, result.stderr
    for name in ("assets", "admin", "login", "app"):
        assert name in result.stdout
    assert "/admin" in result.stdout and "http://127.0.0.1:9000" in result.stdout


def test_check_bad_config_exits_1_naming_the_key(tmp_path: Path) -> None:
    data = yaml.safe_load(_good_yaml())
    bad = copy.deepcopy(data)
    bad["routes"][1]["upsteam"] = bad["routes"][1].pop("upstream")
    bad["tokens"]["leeway"] = 1000
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = _check(path)
    assert result.returncode == 1
    assert "routes[1].upsteam" in result.stderr and "tokens.leeway" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("content", ["routes: [unclosed\n", None])
def test_check_broken_yaml_or_missing_file_exits_1_without_traceback(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "gateway.yaml"
    if content is not None:
        path.write_text(content)
    result = _check(path)
    assert result.returncode == 1
    assert "gateway.yaml" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_serve_refuses_memory_store_with_several_workers_and_refresh(tmp_path: Path) -> None:
    """Each worker would have its own memory store, so refreshes would no longer be single-flight."""
    path = tmp_path / "gateway.yaml"
    data = yaml.safe_load(_good_yaml())
    data["refresh"] = {"endpoint": "http://127.0.0.1:9/token"}
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--workers", "2", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "store.url" in result.stderr and "Traceback" not in result.stderr


def test_serve_bad_config_exits_1_before_serving(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("tokens: {algorithms: [none]}\nroutes: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "tokens.algorithms" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_variable_is_the_only_complaint_about_its_key() -> None:
    """Regression: an unset ${JWT_SECRET} also produced "set exactly one of..." and "at least 32 bytes"."""
    data = {"tokens": {"algorithms": ["HS256"], "secret": "${JWT_SECRET}"}, "routes": []}
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    tokens = [p for p in info.value.problems if p.startswith("tokens.")]
    assert tokens == [
        "tokens.secret: environment variable JWT_SECRET is not set (use ${JWT_SECRET:-default} for a default)"
    ]
    assert any(p.startswith("routes") for p in info.value.problems)  # other problems are still all reported


# --- limits (server.limits, routes[].max_body) ---


def test_limits_have_safe_defaults() -> None:
    config = parse_config(minimal(), env={})
    limits = config.server.limits
    assert (limits.header_bytes, limits.header_count, limits.max_connections) == (65_536, 100, 1000)
    assert (limits.header_timeout, limits.idle_timeout) == (10, 5)
    assert config.routes[0].max_body is None  # no body limit unless a route sets one


def test_limits_out_of_range_are_refused_naming_each_key() -> None:
    limits = {"header_bytes": 10, "header_count": 0, "header_timeout": 0, "max_connections": 0}
    data = minimal(server={"limits": limits})
    data["routes"][0]["max_body"] = -1
    problems = problems_of(data)
    for key in ("header_bytes", "header_count", "header_timeout", "max_connections"):
        assert has(problems, f"server.limits.{key}"), problems
    assert has(problems, "routes[0].max_body"), problems


def test_cookies_max_total_and_names_that_chunks_could_confuse() -> None:
    """Issue 16: cookies.max_total bounds big tokens in cookies; a name must not be the other's `<name>_N` chunk."""
    assert parse_config(minimal()).cookies.max_total == 12288
    assert has(problems_of(minimal(cookies={"max_total": 100})), "cookies.max_total")
    for access, refresh in (("s", "s_1"), ("rt_0", "rt"), ("same", "same")):
        data = minimal(cookies={"access": {"name": access}, "refresh": {"name": refresh}})
        assert has(problems_of(data), "cookies", "chunk"), (access, refresh)
    assert parse_config(minimal(cookies={"access": {"name": "s"}, "refresh": {"name": "s_r"}})).cookies.max_total
    # The cookies must fit in a request's head, with room for the rest of it.
    small_heads = minimal(server={"limits": {"header_bytes": 12288}})
    assert parse_config(small_heads).cookies.max_total == 12288  # the default: left alone
    small_heads["cookies"] = {"max_total": 8192}
    assert parse_config(small_heads).cookies.max_total == 8192
    small_heads["cookies"] = {"max_total": 9000}
    assert has(problems_of(small_heads), "cookies.max_total", "server.limits.header_bytes")


# --- opaque access tokens (tokens.introspection / tokens.userinfo) ---


def _opaque(**tokens: Any) -> dict[str, Any]:
    return minimal(tokens=tokens)


INTROSPECTION = {"endpoint": "https://idp.example/o/introspect/", "client_id": "gw", "client_secret": "s"}


def test_introspection_needs_no_key_source_and_fills_its_defaults() -> None:
    config = parse_config(_opaque(introspection=INTROSPECTION), env={})
    introspection = config.tokens.introspection
    assert introspection is not None and config.tokens.opaque is introspection and not config.tokens.has_keys
    assert (introspection.client_auth, introspection.cache, introspection.timeout) == ("basic", 60, 5)
    userinfo = parse_config(_opaque(userinfo={"endpoint": "https://idp.example/o/userinfo/", "cache": 10}), env={})
    assert userinfo.tokens.userinfo is not None and userinfo.tokens.userinfo.cache == 10


def test_introspection_and_userinfo_together_are_refused() -> None:
    userinfo = {"endpoint": "https://idp.example/o/userinfo/"}
    assert has(problems_of(_opaque(introspection=INTROSPECTION, userinfo=userinfo)), "tokens.userinfo", "not both")


def test_without_opaque_tokens_a_key_source_is_still_required() -> None:
    assert has(problems_of(_opaque()), "tokens.secret", "or introspection or userinfo")


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"endpoint": "ftp://idp/introspect"}, "tokens.introspection.endpoint"),
        ({"client_auth": "none"}, "tokens.introspection.client_auth"),
        ({"cache": -1}, "tokens.introspection.cache"),
        ({"cache": 7200}, "tokens.introspection.cache"),
        ({"secret": "x"}, "tokens.introspection.secret"),
        ({"endpoint": "http://idp/introspect", "tls": {"verify": False}}, "tokens.introspection.tls"),
    ],
)
def test_bad_introspection_settings_name_their_key(patch: dict[str, Any], key: str) -> None:
    assert has(problems_of(_opaque(introspection={**INTROSPECTION, **patch})), key)


def test_gateway_check_names_a_bad_introspection_key(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_opaque(introspection={**INTROSPECTION, "cache": "soon"})))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "tokens.introspection.cache" in result.stdout + result.stderr


def test_the_session_cookie_may_not_share_a_token_cookies_name_or_chunk() -> None:
    for name in ("gw_access", "gw_refresh", "gw_access_0", "gw_refresh_12"):
        data = minimal(session={"mode": "server", "cookie": {"name": name}})
        assert has(problems_of(data), "session.cookie.name"), name
    assert parse_config(minimal(session={"mode": "server", "cookie": {"name": "gw_access_x"}}))
