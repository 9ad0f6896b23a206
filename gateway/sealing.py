"""Sealing of values kept in the shared store or in cookies, and hashing of tokens into store keys.

Three independent keys are derived from one configured secret with HKDF-SHA256 (RFC 5869), each
under its own label: the hash key used for store keys and logs, the store's encryption key, and
the cookies' encryption key. None doubles as another, so a value sealed for the store never
unseals as a cookie, nor the other way round.

Every sealed value is bound to where it lives: the store key (or cookie name) is the AEAD's
associated data, so a value copied to another key by someone who can write to Redis but does
not know the secret does not unseal there (invariant I4, docs/refresh.md).

Cookies are sealed deterministically (AES-SIV, RFC 5297): one token sealed for one cookie name
always gives the same value, so every response that hands out a successor (concurrent requests,
several workers) sets the same cookie. Equal cookies only reveal equal tokens, which the cookie
itself is already the credential for; nothing else about the token can be learnt or forged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import StoreError

_NONCE_BYTES = 12  # the size AES-GCM is designed for (NIST SP 800-38D)


_SIV_TAG_BYTES = 16
# A cookie value, its chunks joined, is at most cookies.max_total bytes (gateway.cookies, at most 1 MiB):
# anything longer is not one of ours.
_MAX_COOKIE_CHARS = 1_048_576


def _derive(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


class Sealer:
    """Hashes tokens for use as keys and seals values with AES-256-GCM; never holds a token itself."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("sealing secret must not be empty")
        self._hash_key = _derive(raw, b"gateway token-hash v1")
        self._aead = AESGCM(_derive(raw, b"gateway seal v1"))
        # AES-SIV takes two AES-256 keys: 64 bytes, derived under a label of their own.
        self._cookie_aead = AESSIV(_derive(raw, b"gateway cookie seal v1", 64))

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

    def seal_cookie(self, value: str, name: str) -> str:
        """``value`` sealed for the cookie ``name``: base64url (no padding) of AES-SIV's tag and ciphertext."""
        sealed = self._cookie_aead.encrypt(value.encode(), [name.encode()])
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open_cookie(self, value: str, name: str) -> str | None:
        """Reverse ``seal_cookie``; None for any value this secret did not seal for ``name``."""
        if len(value) > _MAX_COOKIE_CHARS:
            return None
        try:
            data = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(data) <= _SIV_TAG_BYTES:
            return None
        try:
            plain = self._cookie_aead.decrypt(data, [name.encode()])
            return plain.decode()
        except (InvalidTag, UnicodeDecodeError):
            return None
