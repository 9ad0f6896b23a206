"""gateway/relay.py in-process: which close codes may be sent, and how a text's size is counted."""

from __future__ import annotations

import pytest

from gateway.relay import sendable, utf8_size


@pytest.mark.parametrize(
    ("code", "sent"),
    [(1000, 1000), (1001, 1001), (1011, 1011), (1014, 1014), (4000, 4000), (4999, 4999), (3000, 3000)],
)
def test_sendable_codes_pass_through(code: int, sent: int) -> None:
    assert sendable(code, fallback=1000) == sent


@pytest.mark.parametrize("code", [None, 1004, 1005, 1006, 1015, 1016, 2999, 999, 5000])
def test_codes_that_cannot_be_sent_become_the_fallback(code: int | None) -> None:
    assert sendable(code, fallback=1001) == 1001


@pytest.mark.parametrize(("text", "size"), [("", 0), ("ascii", 5), ("é", 2), ("€", 3), ("😀", 4), ("aé€😀", 10)])
def test_a_text_counts_its_utf8_bytes(text: str, size: int) -> None:
    assert utf8_size(text) == size == len(text.encode())
