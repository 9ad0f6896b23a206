"""The example configs of config/examples/: the placeholder environment they load with, and those that wait
for keys still being built on other branches (issue 16).

``PENDING`` maps an example to the keys it uses that this version does not know yet, each with the branch
that adds it. Such an example is expected to fail `gateway check` with exactly "<key>: unknown key" for each
(tests/unit/test_examples.py, strict xfail): once a branch lands its key, the example loads, the xfail turns
into a failure, and its entry here goes.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # tests/support/ -> the checkout
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))

# Placeholder values for every ${VAR} the example configs use without a default.
ENV = {
    "REDIS_URL": "redis://redis:6379/0",
    "GATEWAY_SECRET": "placeholder-gateway-secret-0123456789abcdef",
    "CLIENT_ID": "legacy-app",
    "CLIENT_SECRET": "placeholder-client-secret",
    "JWT_SECRET": "placeholder-jwt-secret-0123456789abcdef",
    "JWT_SIGNING_KEY": "placeholder-django-signing-key-0123456789abcdef",
}

# example -> {key it needs: the branch that adds it}
PENDING: dict[str, dict[str, str]] = {}

LOADABLE = [path for path in EXAMPLES if path.name not in PENDING]
