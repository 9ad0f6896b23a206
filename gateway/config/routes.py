"""``routes``, ``identity`` and ``websocket``: what is forwarded where, and what the upstream learns."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from gateway.config.base import HEADER_NAME, AuthMode, Model, is_http_url


class IdentityConfig(Model):
    headers: dict[str, str] = Field(
        default_factory=lambda: {"X-Auth-User": "sub", "X-Auth-Email": "email", "X-Auth-Roles": "roles"}
    )
    strip_inbound: tuple[str, ...] = ("X-Auth-*",)
    forward_token: bool = False

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, claim in value.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if not claim or any(not part for part in claim.split(".")):
                raise ValueError(f"{name}: {claim!r} is not a claim path")
        return value


class TimeoutConfig(Model):
    connect: float = Field(5, gt=0)
    read: float = Field(60, gt=0)


class WebSocketConfig(Model):
    close_on_expiry: bool = False
    max_message_size: int = Field(1_048_576, ge=1024)
    idle_timeout: float = Field(300, ge=0)
    max_connections: int = Field(10_000, ge=1)
    ping_interval: float = Field(20, ge=0)


class RequireConfig(Model):
    claims: dict[str, Any] = Field(default_factory=dict)


class CaptureConfig(Model):
    access: str = "access"
    refresh: str = "refresh"
    keep_access: bool = True


class RouteConfig(Model):
    name: str
    path: str
    host: str | None = None
    upstream: str
    auth: AuthMode = "required"
    require: RequireConfig | None = None
    capture: CaptureConfig | None = None
    timeout: TimeoutConfig = TimeoutConfig()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value or "%" in value or "\\" in value:
            raise ValueError("must be a plain path starting with /")
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = urlsplit(value)
        if not is_http_url(value) or parts.query or parts.fragment:
            raise ValueError("not an http(s) URL")
        return value.rstrip("/")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return value.lower() if value else value
