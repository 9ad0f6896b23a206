"""WebSocket benchmark: 1,000 concurrent sockets on one gateway worker, against the upstream direct.

Starts the demo upstream (its WebSocket echo) and `gateway serve` (1 worker, pinned to core 0
when taskset exists; HS256 Bearer); this client and the upstream share core 1. For each target
(direct, gateway) it opens N sockets at once, sends R rounds of one message per socket (all
sockets concurrently) and measures the round trips; twice, the client offering no compression
(the goal's comparison: the same work on core 1 either way) and then permessage-deflate, as
browsers do. Then it holds the sockets open and samples the gateway's RSS, so memory per socket
and its stability are visible. Results go to bench/results/websockets.md.

    .venv/bin/python bench/websocket_bench.py                  # 1,000 sockets, 20 rounds, 30 s hold
    .venv/bin/python bench/websocket_bench.py --sockets 100 --rounds 3 --hold 2 --out bench/out/ws-quick.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import jwt
import yaml
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from proxy_bench import HS_SECRET, PYTHON, Server, free_port, pinned, start  # noqa: E402


async def drive(
    url: str, headers: dict[str, str], sockets: int, rounds: int, server: Server | None, hold: float, deflate: bool
) -> dict:
    opened = time.perf_counter()
    compression = "deflate" if deflate else None
    conns: list[ClientConnection] = await asyncio.gather(
        *(
            connect(url, additional_headers=headers, open_timeout=60, ping_interval=None, compression=compression)
            for _ in range(sockets)
        )
    )
    open_s = time.perf_counter() - opened
    await asyncio.gather(*(c.recv() for c in conns))  # the upstream's hello
    rss_open = server.rss_mb() if server else 0.0
    payload = "x" * 256
    samples: list[float] = []

    async def round_trip(conn: ClientConnection) -> None:
        started = time.perf_counter()
        await conn.send(payload)
        assert await conn.recv() == payload
        samples.append(time.perf_counter() - started)

    cpu = server.cpu_seconds() if server else 0.0
    started = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(round_trip(c) for c in conns))
    busy = time.perf_counter() - started
    cpu = (server.cpu_seconds() - cpu) if server else 0.0
    rss_after = server.rss_mb() if server else 0.0
    held: list[float] = []
    until = time.monotonic() + hold
    while time.monotonic() < until:
        await asyncio.sleep(min(5.0, hold))
        if server:
            held.append(server.rss_mb())
    alive = sum(1 for c in conns if c.state.name == "OPEN")
    await asyncio.gather(*(c.close() for c in conns))
    samples.sort()
    return {
        "open_s": open_s,
        "messages_per_s": len(samples) / busy,
        "cpu_us_per_message": cpu * 1e6 / len(samples),  # of the server, per round trip (two messages relayed)
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1000,
        "rss_open": rss_open,
        "rss_after": rss_after,
        "rss_held": held,
        "alive": alive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3, help="direct/gateway pairs per compression (medians)")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to hold the sockets open, sampling RSS")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "websockets.md"))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # this client shares core 1 with the upstream, as the gateway has core 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))  # 2 fds per socket here
    workdir = Path(tempfile.mkdtemp(prefix="gateway-ws-bench-"))
    port = free_port()
    upstream = start(
        "upstream",
        pinned(1, [PYTHON, "-m", "gateway.demo.upstream", "--port", str(port)]),
        f"http://127.0.0.1:{port}",
        "/",
        workdir,
    )
    config = {
        "server": {"access_log": False},
        "tokens": {"algorithms": ["HS256"], "secret": HS_SECRET},
        "cookies": {"secure": False},
        "websocket": {"max_connections": args.sockets + 100},
        "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
    }
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gport = free_port()
    command = [PYTHON, "-m", "gateway", "serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(gport)]
    gateway = start(
        "gateway",
        pinned(0, [*command, "--log-level", "warning"]),
        f"http://127.0.0.1:{gport}",
        "/.gateway/health",
        workdir,
    )
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, HS_SECRET, algorithm="HS256")
    ws_direct, ws_gateway = upstream.url.replace("http", "ws") + "/ws", gateway.url.replace("http", "ws") + "/ws"
    bearer = {"Authorization": f"Bearer {token}"}
    results: dict[str, dict] = {}
    pairs: dict[str, list[float]] = {"plain": [], "deflate": []}  # gateway / direct rate, pair by pair
    try:
        idle = gateway.rss_mb()
        for number in range(args.pairs):
            for deflate in (False, True):
                kind = "deflate" if deflate else "plain"
                direct = asyncio.run(drive(ws_direct, {}, args.sockets, args.rounds, None, 0, deflate))
                hold = args.hold if deflate and number == args.pairs - 1 else 0
                proxied = asyncio.run(drive(ws_gateway, bearer, args.sockets, args.rounds, gateway, hold, deflate))
                pairs[kind].append(proxied["messages_per_s"] / direct["messages_per_s"])
                for name, result in ((f"direct-{kind}", direct), (f"gateway-{kind}", proxied)):
                    results.setdefault(name, {"runs": []})["runs"].append(result)
                print(
                    f"{kind}: direct {direct['messages_per_s']:.0f} msg/s, gateway {proxied['messages_per_s']:.0f} "
                    f"msg/s ({pairs[kind][-1]:.2f}x), {proxied['cpu_us_per_message']:.0f} us CPU per round trip"
                )
        for entry in results.values():  # medians over the pairs; the last run's memory figures
            runs = entry.pop("runs")
            entry.update(runs[-1])
            for key in ("open_s", "messages_per_s", "cpu_us_per_message", "p50_ms", "p99_ms"):
                entry[key] = statistics.median(run[key] for run in runs)
    finally:
        gateway.stop()
        upstream.stop()
    proxied = results["gateway-deflate"]
    per_socket = (proxied["rss_open"] - idle) * 1024 / args.sockets
    held = proxied["rss_held"] or [proxied["rss_after"]]

    def ratio(kind: str) -> float:
        return statistics.median(pairs[kind])

    lines = [
        f"# WebSocket benchmark, {date.today().isoformat()}",
        "",
        f"{args.sockets} concurrent sockets, {args.rounds} rounds of one 256-byte message per socket (all at once), "
        "echoed by the demo upstream; the gateway is one worker pinned to core 0 (HS256 Bearer at the handshake), "
        "the upstream and this client pinned to core 1, in both runs: the gateway's only effect on the rate is "
        "whether it keeps up. Twice: the client offering no compression (no hop compresses: the client's and the "
        "upstream's work are the same direct and through the gateway), then offering permessage-deflate as browsers "
        "do (direct, client and upstream compress; through the gateway the client's hop does, the upstream's does "
        "not: the gateway does not offer it upstream).",
        "",
        "Medians over the pairs:",
        "",
        "| client offers | target | open all (s) | messages/s | p50 ms | p99 ms | gateway CPU µs per round trip |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {'deflate' if name.endswith('deflate') else 'no compression'} | {name.split('-')[0]} | "
            f"{r['open_s']:.2f} | {r['messages_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['cpu_us_per_message']:.0f} |".replace("| 0 |", "| - |")
            for name, r in results.items()
        ),
        "",
        f"Gateway / direct message rate, median of {args.pairs} pairs (each: direct, then the gateway): "
        f"**{ratio('plain'):.2f}x** without compression (goal ≥ 0.9; pairs "
        f"{', '.join(f'{r:.2f}' for r in pairs['plain'])}), {ratio('deflate'):.2f}x with deflate offered (pairs "
        f"{', '.join(f'{r:.2f}' for r in pairs['deflate'])}). Gateway CPU per round trip (one message each way): "
        f"{results['gateway-plain']['cpu_us_per_message']:.0f} us without compression, "
        f"{proxied['cpu_us_per_message']:.0f} us with it.",
        "",
        f"Gateway RSS (the deflate run): {idle:.0f} MB idle -> {proxied['rss_open']:.0f} MB with {args.sockets} "
        f"sockets open (~{per_socket:.0f} KB per socket) -> {proxied['rss_after']:.0f} MB after the rounds; held "
        f"{args.hold:g} s: {', '.join(f'{mb:.0f}' for mb in held)} MB. "
        f"Sockets still open at the end: {proxied['alive']} of {args.sockets}.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
