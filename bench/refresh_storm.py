"""Refresh-storm benchmark: what waiting for one shared refresh costs, against the IdP's own latency.

One run starts redis-server (unless REDIS_URL is set), the demo IdP, the echo upstream and
`gateway serve --workers 4`, then for each IdP latency fires several storms: N concurrent
requests carrying the same expired session (a fresh session per storm). Every request must
succeed, with one IdP call per storm. Right before each storm, N requests with a valid token
measure what the same burst costs without any refresh (same warm connections): on a small
machine the burst itself queues for the cores, and that is not the refresh's doing.

Reported per latency, as medians over the storms: client latency p50/p99 of the valid burst and
of the storm, the storm minus the IdP's latency, and the **overhead**: storm p99 − IdP latency −
valid p99, i.e. what coordinating the refresh added to the slowest requests beyond the IdP's own
time and the burst's own queueing (target: ≤ 50 ms).

    .venv/bin/python bench/refresh_storm.py [--requests 200] [--storms 5] [--latencies 0.05,0.2,1.0] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.servers import free_port, start_gateway, start_idp, start_upstream  # noqa: E402

from gateway.sealing import Sealer  # noqa: E402

SECRET = "bench-hs256-secret-0123456789abcdef-xyz"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fire(client: aiohttp.ClientSession, url: str, cookie: str, count: int) -> tuple[list[float], list[int]]:
    async def one() -> tuple[float, int]:
        started = time.perf_counter()
        async with client.get(url, headers={"Cookie": cookie}) as response:
            await response.read()
        return time.perf_counter() - started, response.status

    results = await asyncio.gather(*(one() for _ in range(count)))
    return [r[0] for r in results], [r[1] for r in results]


async def measure(
    gateway: str, valid: str, session: dict[str, str], count: int
) -> tuple[list[float], list[float], list[int]]:
    """Baseline (valid token) first, on the same warm connections the storm then uses."""
    # aiohttp as the load generator: on 2 shared cores, httpx's client cost dominated the figures.
    connector = aiohttp.TCPConnector(limit=count)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as client:
        await fire(client, f"{gateway}/warm", f"gw_access={valid}", count)
        base, _ = await fire(client, f"{gateway}/b", f"gw_access={valid}", count)
        sealed = Sealer("bench-store-secret").seal_cookie(session["refresh"], "gw_refresh")  # as the gateway sets it
        cookie = f"gw_access={session['access']}; gw_refresh={sealed}"
        storm, statuses = await fire(client, f"{gateway}/s", cookie, count)
    return base, storm, statuses


@dataclass
class Storm:
    base: list[float]
    storm: list[float]
    ok: int
    calls: int

    def overhead(self, latency: float) -> float:
        return percentile(self.storm, 0.99) - latency - percentile(self.base, 0.99)


def row(latency: float, requests: int, storms: list[Storm], wall: float) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values) * 1000

    b50 = med([percentile(s.base, 0.5) for s in storms])
    b99 = med([percentile(s.base, 0.99) for s in storms])
    p50 = med([percentile(s.storm, 0.5) for s in storms])
    p99 = med([percentile(s.storm, 0.99) for s in storms])
    overheads = [s.overhead(latency) * 1000 for s in storms]
    calls = sorted({s.calls for s in storms})
    return (
        f"| {latency * 1000:.0f} | {len(storms)} × {requests} | {sum(s.ok for s in storms)} | "
        f"{'/'.join(map(str, calls))} | {wall:.1f} | {b50:.1f} / {b99:.1f} | {p50:.1f} / {p99:.1f} | "
        f"{p50 - latency * 1000:.1f} / {p99 - latency * 1000:.1f} | "
        f"**{statistics.median(overheads):.1f}** ({min(overheads):.1f} to {max(overheads):.1f}) |"
    )


def redis_url() -> tuple[str, subprocess.Popen[bytes] | None]:
    if url := os.environ.get("REDIS_URL"):
        return url, None
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install it or set REDIS_URL")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""], stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return url, proc
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--latencies", default="0.05,0.2,1.0")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--storms", type=int, default=5, help="storms per IdP latency (medians reported)")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    latencies = [float(x) for x in args.latencies.split(",")]
    url, redis_proc = redis_url()
    rows = []
    try:
        with start_idp(secret=SECRET) as idp, start_upstream() as upstream:
            config = {
                "store": {"url": url, "key_prefix": f"gwbench:{os.getpid()}:", "secret": "bench-store-secret"},
                "tokens": {"algorithms": ["HS256"], "secret": SECRET, "audience": "legacy-app", "leeway": 0},
                "refresh": {
                    "endpoint": f"{idp.url}/token",
                    "client_id": "legacy-app",
                    "client_secret": "demo-secret",
                    "timeout": 10,
                },
                "cookies": {"secure": False},
                "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
            }
            with start_gateway(config, workers=args.workers) as gateway:
                for latency in latencies:
                    idp.behaviour(latency=latency)
                    storms = []
                    started = time.perf_counter()
                    for _ in range(args.storms):
                        idp.reset()
                        idp.behaviour(latency=latency)
                        valid = idp.issue("alice")["access"]
                        session = idp.issue("alice", access_ttl=-60)
                        base, storm, statuses = asyncio.run(measure(gateway.url, valid, session, args.requests))
                        calls = idp.stats()["refresh_calls"]
                        storms.append(Storm(base, storm, sum(1 for s in statuses if s == 200), calls))
                    wall = time.perf_counter() - started
                    rows.append(row(latency, args.requests, storms, wall))
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
    header = [
        f"Refresh storm, {date.today()}, {platform.machine()} with {os.cpu_count()} cores, "
        f"`gateway serve --workers {args.workers}`, Redis store; client latency in ms.",
        "",
        "| IdP latency ms | storms × requests | 200s | IdP calls per storm | wall s | valid token p50 / p99 "
        "| storm p50 / p99 | storm − IdP p50 / p99 | p99 overhead: storm − IdP − valid (range) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
