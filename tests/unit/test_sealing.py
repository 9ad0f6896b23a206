"""Sealer: keyed token hashes and authenticated encryption of stored values."""

from __future__ import annotations

import pytest

from gateway.errors import StoreError
from gateway.sealing import Sealer

TOKEN = "eyJhbGciOiJSUzI1NiJ9.refresh-token-value.sig"


def test_token_hash_is_stable_short_hex_and_keyed() -> None:
    sealer = Sealer("s3cret")
    digest = sealer.token_hash(TOKEN)
    assert digest == Sealer(b"s3cret").token_hash(TOKEN), "every process must derive the same key"
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert TOKEN not in digest
    assert digest != sealer.token_hash(TOKEN + "x")
    assert digest != Sealer("other").token_hash(TOKEN)


def test_seal_round_trip_and_nonce_is_fresh() -> None:
    sealer = Sealer("s3cret")
    first, second = sealer.seal(TOKEN.encode(), "result:{h}"), sealer.seal(TOKEN.encode(), "result:{h}")
    assert first != second
    assert TOKEN.encode() not in first
    assert sealer.unseal(first, "result:{h}") == TOKEN.encode()
    assert Sealer("s3cret").unseal(second, "result:{h}") == TOKEN.encode()
    assert sealer.unseal(sealer.seal(b"", "k"), "k") == b""


def test_a_value_copied_to_another_key_does_not_unseal() -> None:
    """Regression (issue 12, I4): someone with Redis write access but not the secret moves a value."""
    sealer = Sealer("s3cret")
    alices = sealer.seal(b'{"access": "alice"}', "result:{root-a}:h1")
    with pytest.raises(StoreError, match="could not be decrypted"):
        sealer.unseal(alices, "result:{root-b}:h2")
    assert sealer.unseal(alices, "result:{root-a}:h1") == b'{"access": "alice"}'


@pytest.mark.parametrize("damage", ["flip_body", "flip_nonce", "truncate", "empty"])
def test_unseal_rejects_tampering(damage: str) -> None:
    sealer = Sealer("s3cret")
    sealed = bytearray(sealer.seal(b"tokens", "k"))
    if damage == "flip_body":
        sealed[-1] ^= 1
    elif damage == "flip_nonce":
        sealed[0] ^= 1
    elif damage == "truncate":
        sealed = sealed[:20]
    else:
        sealed = bytearray()
    with pytest.raises(StoreError, match="could not be decrypted"):
        sealer.unseal(bytes(sealed), "k")


def test_unseal_with_wrong_secret_fails() -> None:
    with pytest.raises(StoreError, match="could not be decrypted"):
        Sealer("other").unseal(Sealer("s3cret").seal(b"tokens", "k"), "k")


def test_empty_secret_is_refused_and_repr_hides_it() -> None:
    with pytest.raises(ValueError):
        Sealer("")
    assert "s3cret" not in repr(Sealer("s3cret"))


# --- cookies (issue 14, item 10) ----------------------------------------------------------------------


def test_cookie_sealing_round_trip_is_deterministic_and_cookie_safe() -> None:
    sealer = Sealer("s3cret")
    value = sealer.seal_cookie(TOKEN, "__Host-gw_refresh")
    assert value == Sealer("s3cret").seal_cookie(TOKEN, "__Host-gw_refresh")
    assert all(c.isalnum() or c in "-_" for c in value)  # base64url without padding: a valid cookie value
    assert TOKEN not in value
    assert sealer.open_cookie(value, "__Host-gw_refresh") == TOKEN


def test_a_cookie_opens_only_for_its_name_and_secret() -> None:
    value = Sealer("s3cret").seal_cookie(TOKEN, "__Host-gw_refresh")
    assert Sealer("s3cret").open_cookie(value, "__Host-gw_access") is None
    assert Sealer("other").open_cookie(value, "__Host-gw_refresh") is None


def test_store_values_and_cookies_are_sealed_under_different_keys() -> None:
    """A value sealed for the store never opens as a cookie, nor the other way round."""
    import base64

    sealer = Sealer("s3cret")
    stored = sealer.seal(TOKEN.encode(), "__Host-gw_refresh")
    as_cookie = base64.urlsafe_b64encode(stored).rstrip(b"=").decode()
    assert sealer.open_cookie(as_cookie, "__Host-gw_refresh") is None
    cookie = sealer.seal_cookie(TOKEN, "head:{root}")
    with pytest.raises(StoreError):
        sealer.unseal(base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4)), "head:{root}")


@pytest.mark.parametrize("value", ["", "A", "AAAA", "%%%%", "a b", "A" * 5000, "===="])
def test_junk_cookies_do_not_open_and_never_raise(value: str) -> None:
    assert Sealer("s3cret").open_cookie(value, "gw_refresh") is None
