"""Soak: many browser sessions whose access tokens keep expiring, steady traffic, config reload storms.

One run starts redis-server (unless REDIS_URL is set), the demo IdP (rotating, single-use
refresh tokens that revoke their family on reuse; access tokens live ACCESS_TTL seconds), the
echo upstream and `gateway serve --workers 4`. Each simulated session behaves like a browser
tab: a page load of a few parallel requests every second or so, keeping whatever cookies the
last response set. Every 30 s a reload storm rewrites gateway.yaml several times and sends
SIGHUP. Reported: requests, refreshes (rotations seen), IdP refresh calls per rotation (must be
1.00), spurious logouts (401s: must be 0), 503s, p50/p99 latency, RSS per worker over time.

    .venv/bin/python bench/soak.py [--minutes 15] [--sessions 200] [--out bench/results/soak.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import date
from http.cookies import SimpleCookie
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from refresh_storm import redis_url  # noqa: E402
from support.servers import GatewayProcess, start_gateway, start_idp, start_upstream  # noqa: E402

from gateway.sealing import Sealer  # noqa: E402

SECRET = "soak-hs256-secret-0123456789abcdef-xyz"
ACCESS_TTL = 5


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.rotations = 0
        self.errors = 0
        self.reasons: dict[str, int] = {}


async def session_loop(
    client: aiohttp.ClientSession, url: str, tokens: dict[str, str], stop: float, stats: Stats
) -> None:
    sealed = Sealer("soak-store-secret").seal_cookie(tokens["refresh"], "gw_refresh")  # as the gateway sets it
    cookies = {"gw_access": tokens["access"], "gw_refresh": sealed}
    while time.monotonic() < stop:
        header = "; ".join(f"{k}={v}" for k, v in cookies.items())

        async def one(i: int, header: str = header) -> dict[str, str]:
            started = time.perf_counter()
            try:
                async with client.get(f"{url}/page/{i}", headers={"Cookie": header}) as response:
                    body = await response.read()
                    if response.status >= 400 and body.startswith(b"{"):
                        reason = json.loads(body).get("reason", "?")
                        stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
                    stats.latencies.append(time.perf_counter() - started)
                    stats.statuses[response.status] = stats.statuses.get(response.status, 0) + 1
                    found: dict[str, str] = {}
                    for line in response.headers.getall("Set-Cookie", []):
                        parsed: SimpleCookie = SimpleCookie()
                        parsed.load(line)
                        found.update({name: morsel.value for name, morsel in parsed.items()})
                    return found
            except (aiohttp.ClientError, TimeoutError):
                stats.errors += 1
                return {}

        results = await asyncio.gather(*(one(i) for i in range(random.randint(1, 4))))
        for found in results:
            if found.get("gw_refresh") and found["gw_refresh"] != cookies["gw_refresh"]:
                stats.rotations += 1
                cookies = {"gw_access": found["gw_access"], "gw_refresh": found["gw_refresh"]}
                break
        await asyncio.sleep(random.uniform(0.6, 1.4))


async def reload_storms(gateway: GatewayProcess, config: dict[str, object], stop: float) -> int:
    storms = 0
    while time.monotonic() + 30 < stop:
        await asyncio.sleep(30)
        for i in range(5):
            config["identity"] = {"headers": {"X-Auth-User": "sub", "X-Auth-Roles": "roles", "X-Soak": "sub"}}
            text = yaml.safe_dump(config) + f"# storm {storms} write {i}\n"
            tmp = gateway.config_path + ".tmp"
            Path(tmp).write_text(text)
            os.replace(tmp, gateway.config_path)
            await asyncio.sleep(0.3)
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)
        storms += 1
    return storms


def worker_rss(gateway: GatewayProcess) -> list[float]:
    assert gateway.process is not None
    pids = subprocess.run(["pgrep", "-P", str(gateway.process.pid)], capture_output=True, text=True).stdout.split()
    sizes = []
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return sorted(sizes)


async def run(args: argparse.Namespace) -> list[str]:
    url, redis_proc = redis_url()
    lines: list[str] = []
    try:
        with start_idp(secret=SECRET, access_ttl=ACCESS_TTL) as idp, start_upstream() as upstream:
            config: dict[str, object] = {
                "store": {"url": url, "key_prefix": f"gwsoak:{os.getpid()}:", "secret": "soak-store-secret"},
                "tokens": {"algorithms": ["HS256"], "secret": SECRET, "audience": "legacy-app", "leeway": 0},
                "refresh": {"endpoint": f"{idp.url}/token", "client_id": "legacy-app", "client_secret": "demo-secret"},
                "server": {"access_log": False},
                "cookies": {"secure": False},
                "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
            }
            with start_gateway(config, workers=args.workers) as gateway:
                sessions = [idp.issue(random.choice(["alice", "bob"])) for _ in range(args.sessions)]
                idp.reset()
                stats = Stats()
                stop = time.monotonic() + args.minutes * 60
                rss: list[tuple[float, list[float]]] = []
                connector = aiohttp.TCPConnector(limit=400)
                timeout = aiohttp.ClientTimeout(total=30)
                async with aiohttp.ClientSession(
                    connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout
                ) as client:
                    loops = [asyncio.create_task(session_loop(client, gateway.url, s, stop, stats)) for s in sessions]
                    storms = asyncio.create_task(reload_storms(gateway, config, stop if args.reloads else 0))
                    started = time.monotonic()
                    while time.monotonic() < stop:
                        rss.append((time.monotonic() - started, worker_rss(gateway)))
                        await asyncio.sleep(min(30.0, max(5.0, args.minutes * 60 / 30)))
                    await asyncio.gather(*loops)
                    storm_count = await storms
                idp_stats = idp.stats()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
    total = sum(stats.statuses.values())
    ordered = sorted(stats.latencies)
    p50 = ordered[len(ordered) // 2] * 1000 if ordered else 0.0
    p99 = ordered[int(len(ordered) * 0.99)] * 1000 if ordered else 0.0
    calls = idp_stats["refresh_calls"]
    per_rotation = calls / stats.rotations if stats.rotations else float("nan")
    lines += [
        f"# Soak, {date.today()}",
        "",
        f"{args.minutes:g} minutes, {args.sessions} sessions (access tokens live {ACCESS_TTL} s), "
        f"`gateway serve --workers {args.workers}`, Redis store, the rotating demo IdP; "
        f"{storm_count} reload storms (5 rewrites of gateway.yaml + SIGHUP, every 30 s). "
        f"Load generator, gateway, IdP, Redis and upstream share {os.cpu_count()} cores.",
        "",
        "| requests | statuses | rotations seen | IdP refresh calls | calls per rotation | spurious logouts (401) "
        "| 503 | client errors | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {total} | {dict(sorted(stats.statuses.items()))} | {stats.rotations} | {calls} | {per_rotation:.2f} "
        f"| {stats.statuses.get(401, 0)} | {stats.statuses.get(503, 0)} | {stats.errors} | {p50:.1f} | {p99:.1f} |",
        "",
        f"Denial reasons: {stats.reasons or 'none'}. IdP: {idp_stats}",
        "",
        "RSS per worker over time (s: MB, one figure per worker):",
        "",
        *(f"- {t:.0f} s: {', '.join(f'{mb:.0f}' for mb in sizes)}" for t, sizes in rss),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--no-reloads", dest="reloads", action="store_false", help="skip the reload storms")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.md"))
    args = parser.parse_args()
    lines = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
