"""gateway.logs: what a request puts in a log line cannot end that line or forge the next."""

from __future__ import annotations

import logging

import pytest

from gateway.logs import FORMAT, EscapingFormatter


def formatted(msg: str, *args: object) -> str:
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, msg, args, None)
    return EscapingFormatter(FORMAT).format(record)


@pytest.mark.parametrize("forged", ["\n", "\r", "\r\n", "\x1b[2J", "\u2028", "\x85", "\x00"])
def test_control_characters_in_values_are_escaped(forged: str) -> None:
    line = formatted("denied %s %s route=%s", "GET", f"/x{forged}2026-12-03 INFO gateway: admin in", None)
    assert "\n" not in line and "\r" not in line and forged not in line
    assert "/x\\x" in line and "admin in route=None" in line


def test_our_own_format_and_plain_values_are_untouched() -> None:
    assert formatted("refresh token=%s outcome=%s", "ab12", "ok").endswith("gateway: refresh token=ab12 outcome=ok")
    assert formatted("bytes %s", b"\n").endswith("gateway: bytes b'\\n'")
