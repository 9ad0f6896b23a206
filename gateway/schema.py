"""JSON Schema of gateway.yaml, generated from the config models.

``python -m gateway.schema`` prints it; ``scripts/schema`` writes ``config/gateway.schema.json``,
which editors use to validate and complete gateway.yaml (``# yaml-language-server: $schema=...``).
The schema cannot express every rule (exactly one key source, HS secret length, duplicate route
names): ``gateway check`` remains the authority.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gateway.config import GatewayConfig

SCHEMA_ID = "urn:gateway:config:gateway.schema.json"  # no public URL yet; editors map the file by path
DESCRIPTION = (
    "gateway.yaml: an ASGI reverse proxy with JWT authentication and race-free token refresh. "
    "The loader expands ${VAR} and ${VAR:-default} in every string before validation, so this schema "
    "describes the expanded form: a ${VAR} where a number or boolean is expected is valid for the "
    "gateway but may be flagged by an editor. Unknown keys are errors. Durations are seconds. "
    "Rules the schema cannot express are checked by `gateway check`."
)


def build_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of gateway.yaml, with title, $id and description."""
    generated = GatewayConfig.model_json_schema()
    generated.pop("title", None)
    generated.pop("description", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "gateway.yaml",
        "description": DESCRIPTION,
        **generated,
    }


def render() -> str:
    """The schema as the text stored in config/gateway.schema.json."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    """Print the schema to stdout."""
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
