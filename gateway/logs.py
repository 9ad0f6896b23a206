"""Logging setup, the same in the CLI process and in every uvicorn worker process.

Workers are spawned, not forked, so they do not inherit the CLI's handlers: ``configure`` runs
in both. Tokens never reach a log line: code logs a keyed hash of a token, never the token.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str | None = None) -> None:
    """Log to stderr at ``level`` (default $GATEWAY_LOG_LEVEL or info), once per process."""
    level = (level or os.environ.get("GATEWAY_LOG_LEVEL") or "info").upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("gateway").setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per control-plane call is noise
    access = logging.getLogger("gateway.access")
    if not access.handlers:
        # Access lines are JSON documents, one per line, on stdout (diagnostics go to stderr).
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False
        access.setLevel(logging.INFO)
