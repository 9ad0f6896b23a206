"""Sealing of values kept in the shared store, and hashing of tokens into store keys.

Two independent keys are derived from one configured secret with HKDF-SHA256 (RFC 5869), so the
hash key used for keys and logs never doubles as the encryption key.

Every sealed value is bound to where it lives: the store key (or cookie name) is the AEAD's
associated data, so a value copied to another key by someone who can write to Redis but does
not know the secret does not unseal there (invariant I4, docs/refresh.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import StoreError

_NONCE_BYTES = 12  # the size AES-GCM is designed for (NIST SP 800-38D)


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class Sealer:
    """Hashes tokens for use as keys and seals values with AES-256-GCM; never holds a token itself."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("sealing secret must not be empty")
        self._hash_key = _derive(raw, b"gateway token-hash v1")
        self._aead = AESGCM(_derive(raw, b"gateway seal v1"))

    def __repr__(self) -> str:
        return "Sealer(<secret>)"

    def token_hash(self, token: str) -> str:
        """A short keyed hash of ``token``: stable across processes, safe for store keys and logs."""
        return hmac.new(self._hash_key, token.encode(), hashlib.sha256).hexdigest()[:32]

    def seal(self, plaintext: bytes, bound_to: str) -> bytes:
        """Encrypt and authenticate ``plaintext`` for the place ``bound_to`` (a store key, a cookie name)."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, bound_to.encode())

    def unseal(self, data: bytes, bound_to: str) -> bytes:
        """Reverse ``seal``; StoreError if the value was altered, sealed with another secret or for another place."""
        if len(data) < _NONCE_BYTES + 16:
            raise StoreError("sealed value could not be decrypted")
        try:
            return self._aead.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], bound_to.encode())
        except InvalidTag:
            raise StoreError("sealed value could not be decrypted") from None
