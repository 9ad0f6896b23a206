"""Reference pages generated from code, so they cannot drift from it.

- ``docs/configuration.md``: every key of gateway.yaml from the config models (type, default, constraints,
  the field's docstring; each section's intro is its model's docstring);
- ``docs/metrics.md``: every metric family a ``Metrics`` registers (name, type, labels, help);
- ``docs/reasons.md``: every reason code of ``reasons.Reason`` and what ``send_denial`` answers for each.

``python -m gateway.reference`` (``scripts/docs``) writes them; ``--check`` writes nothing and exits 1
naming each stale file. tests/test_reference.py fails when a committed page differs from its rendering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import types
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, cast, get_args, get_origin

import annotated_types
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.reasons import LOGIN_FAILURES, Reason
from gateway.responses import send_denial

NOTICE = "<!-- Generated from {source} by scripts/docs (python -m gateway.reference). Do not edit by hand. -->"
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "≤"))


# --- docs/configuration.md ----------------------------------------------------------------------


def render_configuration(root: type[BaseModel] = GatewayConfig) -> str:
    """The configuration reference: one section per model, one table row per key path."""
    lines = ["# Configuration reference", "", NOTICE.format(source="gateway/config"), ""]
    lines += [_text(root.__doc__), ""]
    lines += _table([_row(name, field, None, None) for name, field in root.model_fields.items()])
    for name, field in root.model_fields.items():
        model = _model_of(field.annotation)
        if model is not None:
            lines += _section(model, _key(name, field.annotation), _default(field), 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def _section(model: type[BaseModel], path: str, default: Any, level: int) -> list[str]:
    """A heading for ``path``, the model's docstring, a row per key, then the sections of nested models."""
    parent = default if isinstance(default, BaseModel) else None
    lines = ["", f"{'#' * level} `{path}`", "", _text(model.__doc__), ""]
    lines += _table([_row(f"{path}.{name}", field, parent, path) for name, field in model.model_fields.items()])
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        if nested is not None:
            value = getattr(parent, name) if parent is not None else _default(field)
            lines += _section(nested, _key(f"{path}.{name}", field.annotation), value, min(level + 1, 4))
    return lines


def _row(path: str, field: FieldInfo, parent: BaseModel | None, section: str | None) -> list[str]:
    default = _default_text(path, field, parent, section)
    return [
        f"`{_key(path, field.annotation)}`",
        _type(field.annotation),
        default,
        _bounds(field),
        _text(field.description),
    ]


def _table(rows: list[list[str]]) -> list[str]:
    header = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    return header + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _key(path: str, annotation: Any) -> str:
    """``routes`` holds a list of routes: its keys are written ``routes[].name``."""
    return f"{path}[]" if get_origin(annotation) is tuple and _model_of(annotation) is not None else path


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (directly, optionally, or as list items), if any."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        choices = [f"`{choice}`" for choice in args]
        return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    if origin in (Union, types.UnionType):
        named = [_type(arg) for arg in args if arg is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return f"list of {_type(args[0])}s"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return _SCALARS.get(annotation, "any")


def _default(field: FieldInfo) -> Any:
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _default_text(path: str, field: FieldInfo, parent: BaseModel | None, section: str | None) -> str:
    """The value in effect when the key is left out; a key required inside a defaulted section says both."""
    name = path.rsplit(".", 1)[-1]
    if parent is not None:
        value = _literal(getattr(parent, name))
        return f"{value} (required when `{section}` is written)" if field.is_required() else value
    return "required" if field.is_required() else _literal(_default(field))


def _literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "see its keys"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _bounds(field: FieldInfo) -> str:
    found = []
    for kind, attribute, sign in _BOUNDS:
        found += [f"{sign} {getattr(item, attribute)}" for item in field.metadata if isinstance(item, kind)]
    return ", ".join(found)


def _text(doc: str | None) -> str:
    """A docstring as one paragraph of Markdown."""
    return " ".join((doc or "").split())


# --- docs/metrics.md ----------------------------------------------------------------------------


def render_metrics(registry: CollectorRegistry | None = None) -> str:
    """The metrics reference: every family of a fresh ``Metrics`` (or of ``registry``), in registration order."""
    registry = registry if registry is not None else Metrics().registry
    lines = ["# Metrics reference", "", NOTICE.format(source="gateway/metrics.py"), ""]
    lines += [
        "Prometheus text at `{prefix}/metrics` (`/.gateway/metrics` by default). With `--workers N`, any worker",
        "answers for all: counters and histograms are summed, gauges carry a `pid` label per worker.",
        "Histograms expose `_bucket`, `_sum` and `_count` series.",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = ", ".join(f"`{label}`" for label in _label_names(registry, family)) or "none"
        lines.append(f"| `{name}` | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(lines) + "\n"


def _label_names(registry: CollectorRegistry, family: Metric) -> tuple[str, ...]:
    # prometheus-client has no public way to read the label names of a metric that has no samples yet:
    # families built by a custom collector keep them, the library's own metrics keep them on the collector.
    collector = registry._names_to_collectors.get(family.name)
    declared: Any = getattr(family, "_labelnames", ()) or getattr(collector, "_labelnames", ())
    return tuple(str(label) for label in declared if label != "le")


# --- docs/reasons.md ----------------------------------------------------------------------------

OTHER = "any other reason"


DENIALS = [reason for reason in Reason if reason not in LOGIN_FAILURES]


def render_reasons(reasons: Iterable[str] = DENIALS) -> str:
    """The reason table: what ``send_denial`` answers for each code of ``reasons.Reason``, and for any other."""
    lines = ["# Reason codes", "", NOTICE.format(source="gateway/reasons.py and gateway/responses.py"), ""]
    lines += [
        'The gateway\'s own answers name a reason: JSON `{"error": …, "reason": …}` for API clients, an HTML page',
        "for browser navigations. Each row is what `responses.send_denial` sends for that reason.",
        "",
        "| reason | status | error | headers | browser navigation |",
        "|---|---|---|---|---|",
    ]
    for reason in [*reasons, OTHER]:
        status, error, headers = _answer(reason, html=False)
        browser = _answer(reason, html=True)[0]
        navigation = "302 to the login URL, when there is one" if browser == 302 else "HTML page"
        code = reason if reason == OTHER else f"`{reason}`"
        lines.append(f"| {code} | {status} | `{error}` | {', '.join(headers)} | {navigation} |")
    lines += [
        "",
        "## OIDC login failures",
        "",
        'The login callback answers `{"error": "login_failed", "reason": …}` (400 for a request the gateway refuses,',
        "502 or 503 when the IdP fails) with one of:",
        "",
        *(f"- `{reason}`" for reason in Reason if reason in LOGIN_FAILURES),
    ]
    return "\n".join(lines) + "\n"


def _answer(reason: str, *, html: bool) -> tuple[int, str, list[str]]:
    """(status, error, notable headers) of the denial for ``reason``, recorded from ``send_denial``."""
    sent: list[MutableMapping[str, Any]] = []

    async def record(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(send_denial(record, cast(Reason, reason), html=html, login_url="/login?next={next}" if html else None))
    start, body = sent[0], sent[-1]["body"]
    routine = {b"date", b"content-type", b"content-length", b"location"}
    headers = [f"`{n.decode()}: {v.decode()}`" for n, v in start["headers"] if n not in routine]
    error = json.loads(body)["error"] if not html else ""
    return start["status"], error, headers


# --- writing and checking -----------------------------------------------------------------------

PAGES: dict[str, Callable[[], str]] = {
    "docs/configuration.md": render_configuration,
    "docs/metrics.md": render_metrics,
    "docs/reasons.md": render_reasons,
}


def stale(root: Path) -> list[str]:
    """The pages under ``root`` that differ from their rendering (or are missing)."""
    out = []
    for relative, render in PAGES.items():
        path = root / relative
        if not path.is_file() or path.read_text(encoding="utf-8") != render():
            out.append(relative)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Write the pages (or, with ``--check``, name the stale ones and exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.reference", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale page")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="checkout root (default: the current directory)")
    args = parser.parse_args(argv)
    outdated = stale(args.root)
    if args.check:
        for relative in outdated:
            print(f"{relative} is stale: run scripts/docs", file=sys.stderr)
        return 1 if outdated else 0
    for relative in outdated:
        path = args.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PAGES[relative](), encoding="utf-8")
        print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
