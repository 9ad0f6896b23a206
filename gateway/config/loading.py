"""Reading gateway.yaml: parse YAML, expand ``${VAR}``, validate, and report every problem by key path."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.root import GatewayConfig
from gateway.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _expand(node: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of the parsed YAML."""
    if isinstance(node, dict):
        return {k: _expand(v, _join(path, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if env.get(name) or (name in env and default is None):
            return env[name]
        if default is not None:  # like sh: ":-" also covers a variable that is set but empty
            return default
        problems.append(f"{path}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return ""

    return _VAR.sub(substitute, node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_error(error: Any) -> list[str]:
    path = ""
    for part in error["loc"]:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    if error["type"] == "gateway_keys":
        out = []
        for key, message in error["ctx"]["items"]:
            out.append(f"{path}{key}: {message}" if key.startswith("[") else f"{_join(path, key)}: {message}")
        return out
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return [f"{path or '(top level)'}: {message}"]


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate already-parsed YAML; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): the config must be a mapping of keys"])
    problems: list[str] = []
    expanded = _expand(data, "", os.environ if env is None else env, problems)
    try:
        config = GatewayConfig.model_validate(expanded)
    except ValidationError as exc:
        # A key whose variable is missing was validated as "": its knock-on complaints
        # ("set exactly one of ...", "at least 32 bytes") would only hide the real problem.
        missing = {problem.split(":", 1)[0] for problem in problems}
        for error in exc.errors():
            problems.extend(p for p in _format_error(error) if p.split(":", 1)[0] not in missing)
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate gateway.yaml; every failure is a ConfigError, never a traceback."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the config file ({exc.__class__.__name__}: {exc})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})".replace("\n", " ")]) from None
    return parse_config(data, env)
