"""gateway.yaml: strict loading into frozen typed objects.

Loading is three steps and does no I/O besides reading the one file: parse YAML, expand
``${VAR}`` / ``${VAR:-default}`` in strings, validate into pydantic models that forbid unknown
keys. Every problem is collected and reported at once as ``key.path: message``
(``routes[2].upstream: not an http(s) URL``) in a :class:`ConfigError`.

The package holds one module per group of sections (``server``, ``tokens``, ``sessions``,
``routes``, ``cors``), ``root`` for the whole file and the rules across sections, ``loading`` for
reading it, and ``checks`` for rules that need more than the file (the files it names, the
config a reload replaces, the number of workers). Import everything from ``gateway.config``.
"""

from __future__ import annotations

from gateway.config.assertion import AssertionConfig
from gateway.config.base import (
    ASYMMETRIC_ALGORITHMS,
    HS_ALGORITHMS,
    MAX_LEEWAY,
    MIN_HS_SECRET_BYTES,
    AuthMode,
)
from gateway.config.checks import (
    key_weakness,
    load_public_key,
    load_published_key,
    load_signing_key,
    reload_problems,
    ssl_reason,
    tls_context,
    validate_files,
    workers_problems,
)
from gateway.config.cors import CORSConfig
from gateway.config.loading import load_config, parse_config
from gateway.config.root import GatewayConfig
from gateway.config.routes import (
    CaptureConfig,
    IdentityConfig,
    RequireConfig,
    RouteConfig,
    TimeoutConfig,
    WebSocketConfig,
)
from gateway.config.server import LimitsConfig, MetricsListenerConfig, SentinelConfig, ServerConfig, StoreConfig
from gateway.config.sessions import (
    CookiesConfig,
    CookieSpec,
    CSRFConfig,
    LoginConfig,
    LogoutConfig,
    OIDCConfig,
    RefreshCookieSpec,
    SessionConfig,
    SessionCookieSpec,
)
from gateway.config.tls import TLSConfig
from gateway.config.tokens import IntrospectionConfig, RefreshConfig, RefreshFields, TokensConfig, UserinfoConfig
from gateway.errors import ConfigError

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HS_ALGORITHMS",
    "MAX_LEEWAY",
    "MIN_HS_SECRET_BYTES",
    "AssertionConfig",
    "AuthMode",
    "CORSConfig",
    "CSRFConfig",
    "CaptureConfig",
    "ConfigError",
    "CookieSpec",
    "CookiesConfig",
    "GatewayConfig",
    "IdentityConfig",
    "IntrospectionConfig",
    "LimitsConfig",
    "LoginConfig",
    "LogoutConfig",
    "SessionConfig",
    "SessionCookieSpec",
    "MetricsListenerConfig",
    "OIDCConfig",
    "RefreshConfig",
    "RefreshCookieSpec",
    "RefreshFields",
    "RequireConfig",
    "RouteConfig",
    "SentinelConfig",
    "ServerConfig",
    "StoreConfig",
    "TLSConfig",
    "TimeoutConfig",
    "TokensConfig",
    "UserinfoConfig",
    "WebSocketConfig",
    "key_weakness",
    "load_config",
    "load_public_key",
    "load_published_key",
    "load_signing_key",
    "parse_config",
    "reload_problems",
    "ssl_reason",
    "tls_context",
    "validate_files",
    "workers_problems",
]
