"""Logging setup, the same in the CLI process and in every uvicorn worker process.

Workers are spawned, not forked, so they do not inherit the CLI's handlers: ``configure`` runs
in both. Tokens never reach a log line: code logs a keyed hash of a token, never the token.
"""

from __future__ import annotations

import logging
import os
import re
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 controls, DEL, C1 controls and the Unicode line separators: what could end a log line, or
# forge the next one, when a request's path or header is logged (issue 14, point 15).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(value: object) -> object:
    if isinstance(value, str):
        return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", value)
    if isinstance(value, bytes | bytearray):
        return repr(bytes(value))
    return value


class EscapingFormatter(logging.Formatter):
    """Escapes control characters in the values a message is built from (its format string is ours).

    A path such as ``/x%0a2026-01-01 INFO gateway: admin logged in`` is logged as one line,
    ``/x\\x0a2026-...``, never as two.
    """

    def format(self, record: logging.LogRecord) -> str:
        if record.args:
            record = logging.makeLogRecord(record.__dict__)
            if isinstance(record.args, tuple):
                record.args = tuple(_escape(arg) for arg in record.args)
            elif isinstance(record.args, dict):
                record.args = {key: _escape(arg) for key, arg in record.args.items()}
        return super().format(record)


def configure(level: str | None = None) -> None:
    """Log to stderr at ``level`` (default $GATEWAY_LOG_LEVEL or info), once per process."""
    level = (level or os.environ.get("GATEWAY_LOG_LEVEL") or "info").upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
        for handler in root.handlers:
            handler.setFormatter(EscapingFormatter(FORMAT))
    logging.getLogger("gateway").setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per control-plane call is noise
    access = logging.getLogger("gateway.access")
    if not access.handlers:
        # Access lines are JSON documents, one per line, on stdout (diagnostics go to stderr).
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.gateway_stdout = True  # type: ignore[attr-defined]  # accesslog writes past it (see there)
        access.addHandler(handler)
        access.propagate = False
        access.setLevel(logging.INFO)
