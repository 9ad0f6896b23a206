"""gateway.identity: claims -> identity headers, and route rules on claims."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import UnsafeClaim
from gateway.identity import IdentityHeaders, claims_allowed

MAPPING = {
    "X-Auth-User": "sub",
    "X-Auth-Email": "email",
    "X-Auth-Roles": "realm_access.roles",
    "X-Auth-Staff": "is_staff",
    "X-Auth-Level": "level",
    "X-Auth-Org": "org",
}


def build(claims: dict[str, Any], mapping: dict[str, str] | None = None) -> dict[bytes, bytes]:
    headers = IdentityHeaders(mapping or MAPPING).build(claims)
    assert len({name for name, _ in headers}) == len(headers)
    return dict(headers)


def test_header_names_are_lowercase_bytes() -> None:
    assert IdentityHeaders({"X-Auth-User": "sub"}).names == [b"x-auth-user"]


def test_claims_become_headers() -> None:
    headers = build(
        {
            "sub": "alice",
            "email": "alice@example.com",
            "realm_access": {"roles": ["admin", "dev"]},
            "is_staff": True,
            "level": 3,
            "org": {"id": 7, "name": "acme"},
        }
    )
    assert headers == {
        b"x-auth-user": b"alice",
        b"x-auth-email": b"alice@example.com",
        b"x-auth-roles": b"admin,dev",
        b"x-auth-staff": b"true",
        b"x-auth-level": b"3",
        b"x-auth-org": b'{"id":7,"name":"acme"}',
    }


@pytest.mark.parametrize(
    ("value", "text"), [(False, b"false"), (0, b"0"), (2.5, b"2.5"), ([], b""), ([1, True], b"1,true")]
)
def test_scalar_and_list_text(value: Any, text: bytes) -> None:
    assert build({"level": value}, {"X-Auth-Level": "level"}) == {b"x-auth-level": text}


def test_missing_and_null_claims_are_omitted() -> None:
    headers = build({"sub": "alice", "email": None, "realm_access": {"other": 1}})
    assert headers == {b"x-auth-user": b"alice"}


def test_dotted_path_through_non_object_is_missing() -> None:
    assert build({"realm_access": ["roles"]}, {"X-Auth-Roles": "realm_access.roles"}) == {}
    assert build({"realm_access": "roles"}, {"X-Auth-Roles": "realm_access.roles"}) == {}


def test_exact_key_with_dots_wins() -> None:
    claims = {"https://example.com/roles": ["a"], "https://example": {"com/roles": ["b"]}}
    assert build(claims, {"X-Auth-Roles": "https://example.com/roles"}) == {b"x-auth-roles": b"a"}


def test_unicode_is_sent_as_utf8() -> None:
    assert build({"sub": "j\u00fcrgen"}, {"X-Auth-User": "sub"}) == {b"x-auth-user": "j\u00fcrgen".encode()}


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "alice\r\nX-Auth-Roles: admin"},
        {"sub": "alice\nadmin"},
        {"sub": "alice\rx"},
        {"sub": "alice\x00"},
        {"realm_access": {"roles": ["user", "admin\r\nX-Evil: 1"]}},
    ],
)
def test_header_splitting_claims_are_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(UnsafeClaim):
        IdentityHeaders(MAPPING).build(claims)


def test_newline_inside_object_claim_is_escaped_not_refused() -> None:
    assert build({"org": {"n": "a\nb"}}, {"X-Auth-Org": "org"}) == {b"x-auth-org": b'{"n":"a\\nb"}'}


# --- claims_allowed ---


def test_scalar_equals() -> None:
    assert claims_allowed({"tenant": "acme"}, {"tenant": "acme"})
    assert not claims_allowed({"tenant": "acme-evil"}, {"tenant": "acme"})
    assert not claims_allowed({"tenant": "acm"}, {"tenant": "acme"})


def test_list_of_accepted_values() -> None:
    rules = {"tenant": ["acme", "globex"]}
    assert claims_allowed({"tenant": "globex"}, rules)
    assert not claims_allowed({"tenant": "initech"}, rules)


def test_list_claim_containing_one_accepted_value() -> None:
    assert claims_allowed({"roles": ["user", "admin"]}, {"roles": "admin"})
    assert claims_allowed({"roles": ["user", "admin"]}, {"roles": ["ops", "admin"]})
    assert not claims_allowed({"roles": ["user"]}, {"roles": ["ops", "admin"]})
    assert not claims_allowed({"roles": []}, {"roles": "admin"})
    assert not claims_allowed({"roles": "superadmin"}, {"roles": "admin"})  # no substring match


def test_dotted_rule_path() -> None:
    claims = {"realm_access": {"roles": ["staff"]}}
    assert claims_allowed(claims, {"realm_access.roles": "staff"})
    assert not claims_allowed(claims, {"realm_access.roles": "admin"})


def test_missing_claim_fails() -> None:
    assert not claims_allowed({}, {"is_staff": True})
    assert not claims_allowed({"is_staff": None}, {"is_staff": True})
    assert not claims_allowed({"realm_access": {}}, {"realm_access.roles": "staff"})


def test_every_rule_must_pass() -> None:
    rules = {"is_staff": True, "tenant": "acme"}
    assert claims_allowed({"is_staff": True, "tenant": "acme"}, rules)
    assert not claims_allowed({"is_staff": True, "tenant": "other"}, rules)
    assert claims_allowed({"anything": 1}, {})


@pytest.mark.parametrize("value", [1, 1.0, "true", "True", [1], ["true"]])
def test_true_rule_does_not_pass_on_lookalikes(value: Any) -> None:
    assert not claims_allowed({"is_staff": value}, {"is_staff": True})
    assert claims_allowed({"is_staff": True}, {"is_staff": True})


@pytest.mark.parametrize("value", [True, "1"])
def test_numeric_rule_does_not_pass_on_true_or_text(value: Any) -> None:
    assert not claims_allowed({"level": value}, {"level": 1})
    assert claims_allowed({"level": 1}, {"level": 1})


def test_false_rule_does_not_pass_on_zero() -> None:
    assert not claims_allowed({"locked": 0}, {"locked": False})
    assert claims_allowed({"locked": False}, {"locked": False})


@pytest.mark.parametrize("roles", [["viewer,admin"], ["viewer", "a,b"], [["x", "y"]]])
def test_a_list_item_holding_the_separator_is_unsafe(roles: list[object]) -> None:
    # Issue 14 (5): ["viewer,admin"] reached the upstream as "viewer,admin", which it splits into two roles.
    with pytest.raises(UnsafeClaim, match="roles"):
        IdentityHeaders({"X-Auth-Roles": "roles"}).build({"sub": "a", "roles": roles})


def test_list_claims_without_the_separator_are_joined() -> None:
    built = IdentityHeaders({"X-Auth-Roles": "roles"}).build({"roles": ["viewer", "editor"]})
    assert built == [(b"x-auth-roles", b"viewer,editor")]
