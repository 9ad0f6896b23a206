"""What every section model shares: strict frozen models, key-naming errors, small parsers."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

HS_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_LEEWAY = 300
MIN_HS_SECRET_BYTES = 32
# How a route treats tokens; routing.Route keeps the same type.
AuthMode = Literal["required", "optional", "none"]
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def key_problems(*items: tuple[str, str]) -> PydanticCustomError:
    """An error that names sub-keys of the model it is raised on (see ``loading._format_error``)."""
    return PydanticCustomError("gateway_keys", "{summary}", {"summary": "; ".join(m for _, m in items), "items": items})


class Model(BaseModel):
    """Base of every section: unknown keys are errors, loaded values are frozen, and the docstring under
    each field is its description (in the JSON Schema and docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def host_port(value: str) -> tuple[str, int] | None:
    """Split "host:port" (or "[v6]:port"); None unless both parts are present and the port is valid."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def is_http_url(value: str) -> bool:
    """An absolute http(s) URL with a host."""
    parts = urlsplit(value)
    return parts.scheme in {"http", "https"} and bool(parts.hostname)
