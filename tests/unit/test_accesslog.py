"""gateway.accesslog: the access line's fields, and how it reaches stdout.

With the handler ``logs.configure`` gives the access logger, lines bypass logging and are written
together at the end of the event-loop turn; with any other handler they go through logging.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway.accesslog import AccessLog, RequestIds, RequestInfo, _timestamp
from gateway.sealing import Sealer

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")


@contextmanager
def configured() -> Iterator[io.StringIO]:
    """The access logger as ``logs.configure`` sets it up (its handler alone: pytest's capture handlers,
    added once the test runs, are taken off for the while), writing into a buffer."""
    logger = logging.getLogger("gateway.access")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.gateway_stdout = True  # type: ignore[attr-defined]
    logger.handlers[:] = [handler]
    logger.propagate, logger.level = False, logging.INFO
    yield stream
    logger.handlers[:], logger.propagate, logger.level = saved


def a_request(subject: str | None = "alice") -> RequestInfo:
    info = RequestInfo()
    info.identify(b"req-1", RequestIds())
    info.subject, info.upstream = subject, 0.0012
    return info


def test_lines_written_in_one_loop_turn_reach_stdout_together_at_its_end() -> None:
    log = AccessLog(True, Sealer("s" * 32))

    async def serve(stream: io.StringIO) -> tuple[str, str]:
        for number in range(3):
            log.write("GET", f"/p{number}", a_request(), "app", 200, 0.0023)
        during = stream.getvalue()
        await asyncio.sleep(0)  # the turn ends
        return during, stream.getvalue()

    with configured() as stream:
        during, after = asyncio.run(serve(stream))
    assert during == ""
    lines = [json.loads(line) for line in after.splitlines()]
    assert [line["path"] for line in lines] == ["/p0", "/p1", "/p2"]
    first = lines[0]
    assert ISO_MS.fullmatch(first["time"]), first["time"]
    assert first["request_id"] == "req-1" and first["route"] == "app" and first["method"] == "GET"
    assert first["status"] == 200 and first["duration_ms"] == 2.3 and first["upstream_ms"] == 1.2
    assert first["outcome"] == "ok"
    assert first["subject"] == Sealer("s" * 32).token_hash("alice")[:16]


def test_a_line_outside_an_event_loop_is_written_at_once() -> None:
    with configured() as stream:
        AccessLog(True, Sealer("s" * 32)).write("POST", "/x", a_request(None), "-", 401, 0.001)
    line = json.loads(stream.getvalue())
    assert line["subject"] is None and line["status"] == 401


def test_another_handler_gets_every_line_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("gateway.access")
    saved = logger.handlers[:]
    logger.handlers[:] = []
    try:
        with caplog.at_level(logging.INFO, logger="gateway.access"):
            AccessLog(True, Sealer("s" * 32)).write("GET", "/via-logging", a_request(), "app", 200, 0.001)
    finally:
        logger.handlers[:] = saved
    assert [json.loads(r.getMessage())["path"] for r in caplog.records] == ["/via-logging"]


def test_the_timestamp_is_isoformat_with_milliseconds_in_utc() -> None:
    from datetime import UTC, datetime

    before = datetime.now(UTC)
    stamp = datetime.fromisoformat(_timestamp())
    assert ISO_MS.fullmatch(_timestamp())
    assert abs((stamp - before).total_seconds()) < 1.0


class _Writes:
    """A stream that keeps each write (what reaches the pipe in one write(2) once flushed)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_busy_turns_lines_are_written_in_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    """Workers share stdout: a write of up to PIPE_BUF (4096) bytes to a pipe is atomic, a longer one may be
    interleaved with another worker's mid-line. A turn's lines go out in line-aligned writes of at most that."""
    log = AccessLog(True, Sealer("s" * 32))

    async def serve() -> None:
        for number in range(200):  # ~50 KB of lines in one turn
            log.write("GET", f"/p{number}/" + "x" * 40, a_request(), "app", 200, 0.0023)
        await asyncio.sleep(0)

    with configured() as stream:
        writes = _Writes()
        logging.getLogger("gateway.access").handlers[0].stream = writes  # type: ignore[attr-defined]
        asyncio.run(serve())
    assert len(writes.writes) > 1
    assert all(len(text.encode()) <= 4096 and text.endswith("\n") for text in writes.writes)
    lines = "".join(writes.writes).splitlines()
    assert [json.loads(line)["path"] for line in lines] == [f"/p{n}/" + "x" * 40 for n in range(200)]
    assert stream.getvalue() == ""
