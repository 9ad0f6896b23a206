"""Rules that need more than the file itself: the files it names, the config a reload replaces, the workers.

Loading does no I/O besides reading gateway.yaml, so what a key names on disk is checked here, by
``validate_files``, which ``gateway check``, ``gateway serve`` and every reload call after loading: the token
key file, and the PEM files of every ``tls`` key (``tls_context`` builds the SSLContext the gateway then uses).
Each function returns problems in the loader's ``key.path: message`` form (empty when all is well).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from gateway.config.assertion import AssertionConfig
from gateway.config.base import HS_ALGORITHMS
from gateway.config.root import GatewayConfig
from gateway.config.tls import TLSConfig
from gateway.errors import ConfigError

# NIST SP 800-57 / RFC 7518 §3.3: RSA keys of at least 2048 bits; EC curves of at least 256 bits (P-256).
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256


_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}


def validate_files(config: GatewayConfig) -> list[str]:
    """Problems with the files the config names: ``tokens.public_key_file`` must hold a usable public key,
    every ``tls`` key's files readable PEM (a CA certificate, a client certificate with its key), and
    ``identity.assertion.private_key_file`` a private key for its algorithm."""
    problems: list[str] = []
    if config.tokens.public_key_file is not None:
        try:
            load_public_key(config.tokens.public_key_file, config.tokens.algorithms)
        except ConfigError as exc:
            problems += exc.problems
    for key, tls in config.tls_settings():
        try:
            tls_context(key, tls)
        except ConfigError as exc:
            problems += exc.problems
    assertion = config.identity.assertion
    if assertion is not None:
        if assertion.header.lower() in {name.lower() for name in config.identity.headers}:
            problems.append(f"identity.assertion.header: {assertion.header} is also an identity header")
        try:
            load_signing_key(assertion)
        except ConfigError as exc:
            problems += exc.problems
        for index, path in enumerate(assertion.publish_key_files):
            try:
                load_published_key(path, assertion.algorithm, f"identity.assertion.publish_key_files[{index}]")
            except ConfigError as exc:
                problems += exc.problems
    return problems


def tls_context(key: str, tls: TLSConfig) -> ssl.SSLContext:
    """The client SSLContext of the ``tls`` setting at ``key``; ConfigError naming each file it cannot use.

    A ``ca_file`` replaces the system's CAs (a private CA is trusted for this setting, nothing else is). Hostname
    checking stays on: ``server_name`` changes the name checked, never whether it is.
    """
    files = [(name, getattr(tls, name)) for name in ("ca_file", "cert_file", "key_file")]
    problems = []
    for name, path in files:
        if path is None:
            continue
        try:
            Path(path).read_bytes()
        except OSError as exc:
            problems.append(f"{key}.{name}: cannot read {path} ({exc.strerror})")
    if problems:
        raise ConfigError(problems)
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)  # with a cafile, the system's CAs are not loaded
    except ssl.SSLError as exc:
        problems.append(f"{key}.ca_file: {tls.ca_file} holds no PEM CA certificate ({ssl_reason(exc)})")
        context = ssl.create_default_context()
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        try:
            # A password callback, so that an encrypted key is an error here and never a prompt on the terminal.
            context.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                problems.append(f"{key}.key_file: {tls.key_file} is not the private key of {tls.cert_file}")
            else:
                where = f"with the key in {tls.key_file}" if tls.key_file else "holding its private key"
                problems.append(
                    f"{key}.cert_file: {tls.cert_file} is not a PEM certificate {where} ({ssl_reason(exc)})"
                )
    if problems:
        raise ConfigError(problems)
    return context


def ssl_reason(exc: ssl.SSLError) -> str:
    """What OpenSSL said, readable: ``certificate verify failed: unable to get local issuer certificate``."""
    verify_message = getattr(exc, "verify_message", None)
    if isinstance(verify_message, str) and verify_message:
        return f"certificate verify failed: {verify_message}"
    reason = getattr(exc, "reason", None)
    return reason.lower().replace("_", " ") if isinstance(reason, str) else str(exc)


def load_signing_key(config: AssertionConfig) -> Any:
    """The private key of ``identity.assertion``, checked against its algorithm; ConfigError naming the key."""
    path, alg = config.private_key_file, config.algorithm
    where = "identity.assertion.private_key_file"
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path} ({exc.strerror})"]) from None
    except TypeError:
        raise ConfigError([f"{where}: {path} is encrypted; give it unencrypted"]) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError([f"{where}: {path} is not a PEM private key"]) from None
    _check_assertion_key(key.public_key(), alg, where, path)
    return key


def load_published_key(path: str, alg: str, where: str) -> Any:
    """A public key served in the assertion's JWKS without signing (``publish_key_files``): from a public or a
    private PEM key, checked against the algorithm; ConfigError naming ``where``."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path} ({exc.strerror})"]) from None
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        try:
            public = serialization.load_pem_private_key(pem, password=None).public_key()
        except (TypeError, ValueError, UnsupportedAlgorithm):
            raise ConfigError([f"{where}: {path} is not a PEM public key (or an unencrypted private one)"]) from None
    _check_assertion_key(public, alg, where, path)
    return public


def _check_assertion_key(public: Any, alg: str, where: str, path: str) -> None:
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        raise ConfigError([f"{where}: {path} holds a {public.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits"])
    if alg.startswith(("RS", "PS")):
        fits = isinstance(public, rsa.RSAPublicKey)
    elif alg in _CURVES:
        fits = isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == _CURVES[alg]
    else:  # EdDSA
        fits = isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    if not fits:
        raise ConfigError([f"{where}: {path} is not a key for identity.assertion.algorithm {alg}"])


def load_public_key(path: str, algorithms: tuple[str, ...]) -> Any:
    """The public key in the PEM file at ``path`` for one of ``algorithms``; ConfigError when there is none."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"tokens.public_key_file: cannot read {path} ({exc.strerror})"]) from None
    available = get_default_algorithms()
    for alg in algorithms:
        if alg in HS_ALGORITHMS:
            continue
        try:
            key = available[alg].prepare_key(pem)
        except (ValueError, TypeError, jwt.InvalidKeyError):
            continue
        if hasattr(key, "public_key"):  # private keys have public_key(); they cannot verify
            continue
        weak = key_weakness(key)
        if weak is not None:
            raise ConfigError([f"tokens.public_key_file: {path} {weak}"])
        return key
    raise ConfigError([f"tokens.public_key_file: {path} is not a public key for {', '.join(algorithms)}"])


def key_weakness(key: Any) -> str | None:
    """Why a verification key is too weak to trust (an RSA key under 2048 bits, an EC curve under 256), or None."""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"holds a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are required"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        return f"holds a key on the {key.curve.name} curve; at least P-256 ({MIN_EC_BITS} bits) is required"
    return None


def reload_problems(running: GatewayConfig, new: GatewayConfig) -> list[str]:
    """What a running process cannot take from a reloaded file: its store, its listening address, the limits its
    HTTP server was started with, and its forwarding client."""
    problems = []
    if new.store != running.store:
        problems.append("store: changing the store needs a restart")
    if (new.server.host, new.server.port) != (running.server.host, running.server.port):
        problems.append("server.host/server.port: changing the listening address needs a restart")
    if _listener(new) != _listener(running):
        problems.append("server.metrics: the private metrics listener is bound at start; changing it needs a restart")
    if new.server.limits != running.server.limits:
        problems.append("server.limits: the HTTP server's limits are set at start; changing them needs a restart")
    if new.server.forwarder != running.server.forwarder:
        problems.append("server.forwarder: the forwarding client is chosen at start; changing it needs a restart")
    return problems


def _listener(config: GatewayConfig) -> tuple[str, int] | None:
    metrics = config.server.metrics
    return None if metrics is None else (metrics.host, metrics.port)


def workers_problems(config: GatewayConfig, workers: int) -> list[str]:
    """Whether ``gateway serve --workers`` can run this config: memory:// is one process's memory."""
    if workers > 1 and config.store.url.startswith("memory:") and config.refresh.endpoint:
        # Each worker would hold its own memory: refreshes would no longer be single-flight.
        return [f"store.url: memory:// serves one process; use redis:// to run --workers {workers} with refresh"]
    if workers > 1 and config.store.url.startswith("memory:") and config.session.mode == "server":
        # Each worker would hold its own sessions: a login on one would be unknown to the others.
        use = f"use redis:// to run --workers {workers} with session.mode: server"
        return [f"store.url: memory:// serves one process; {use}"]
    return []
