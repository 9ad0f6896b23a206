"""``cookies``, ``login``, ``logout`` and ``csrf``: browser sessions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.config.base import HEADER_NAME, Model, is_http_url


class CookieSpec(Model):
    name: str
    max_age: int | None = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError("not a valid cookie name")
        return value


class CookiesConfig(Model):
    access: CookieSpec = CookieSpec(name="gw_access")
    refresh: CookieSpec = CookieSpec(name="gw_refresh", max_age=1209600)
    secure: bool = True
    same_site: Literal["lax", "strict", "none"] = "lax"


class OIDCConfig(Model):
    issuer: str
    client_id: str
    client_secret: str | None = None
    scopes: tuple[str, ...] = ("openid", "offline_access")
    redirect_url: str

    @field_validator("issuer", "redirect_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError('must include "openid"')
        return value


class LoginConfig(Model):
    url: str | None = None
    oidc: OIDCConfig | None = None


class LogoutConfig(Model):
    redirect: str = "/"


class CSRFConfig(Model):
    allowed_origins: tuple[str, ...] = ()
