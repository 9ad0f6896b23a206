"""Optional OpenTelemetry spans for the stages that take time: authenticate (verify, refresh)
and the upstream call, inside one span per request.

On only with ``server.tracing: true`` and the ``opentelemetry-api`` package installed (the
gateway does not depend on it); the exporter is whatever the process's OpenTelemetry SDK is
configured with (``opentelemetry-instrument``, OTEL_* variables). Spans carry route, method and
status; never a token, a cookie or a claim value.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from typing import Any

log = logging.getLogger("gateway")

try:
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised where the package is absent
    _trace = None  # type: ignore[assignment]

_OFF = contextlib.nullcontext()


class Tracer:
    def __init__(self, enabled: bool) -> None:
        self._tracer: Any = None
        if enabled and _trace is None:
            log.warning("server.tracing is on but opentelemetry-api is not installed: no spans")
        elif enabled and _trace is not None:
            self._tracer = _trace.get_tracer("gateway")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """A span, or a shared no-op when tracing is off (the hot path pays one call)."""
        if self._tracer is None:
            return _OFF
        return self._tracer.start_as_current_span(name, attributes=attributes)  # type: ignore[no-any-return]
