"""Migrate the sqlite database, then serve the project's ASGI app under uvicorn on loopback."""

from __future__ import annotations

import argparse
import os

import django
import uvicorn
from django.core.management import call_command


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m support.django_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "support.django_app.settings")
    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    uvicorn.run("support.django_app.asgi:application", host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
