"""Baseline: the Python ASGI floor of issue 17, a Starlette app on uvicorn answering 1 KB itself.

`/read` (POST) reads the request body whole before answering, and `/1m` answers 1 MB from memory: the floors of
the body cases.

No upstream, no auth: what one request costs in uvicorn's httptools protocol, the uvloop event loop and
Starlette's routing. Served with the gateway's own server options (`gateway serve`, gateway/cli.py): uvloop,
httptools, one worker, no access log, no Server or Date header.

    python bench/baselines/starlette_floor.py --port 9103
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY_1K = b"x" * 1024


BODY_1M = b"x" * 1_048_576


async def one_kilobyte(request: Request) -> Response:
    return Response(BODY_1K, media_type="text/plain")


async def read_then_one_kilobyte(request: Request) -> Response:
    await request.body()  # the floor of a POST: the body read whole, as a forwarder must read it
    return Response(BODY_1K, media_type="text/plain")


async def one_megabyte(request: Request) -> Response:
    return Response(BODY_1M, media_type="application/octet-stream")


app = Starlette(
    routes=[
        Route("/read", read_then_one_kilobyte, methods=["POST"]),
        Route("/1m", one_megabyte),
        Route("/{path:path}", one_kilobyte, methods=["GET", "POST"]),
    ]
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )
