"""WebSocket benchmark: 1,000 concurrent sockets on one gateway worker, against the upstream direct.

Starts the demo upstream (its WebSocket echo) and `gateway serve` (1 worker, pinned to core 0
when taskset exists; HS256 Bearer). For each target (direct, gateway) it opens N sockets at
once, sends R rounds of one message per socket (all sockets concurrently) and measures the
round trips, then holds the sockets open and samples the gateway's RSS, so memory per socket
and its stability are visible. Results go to bench/results/websockets.md.

    .venv/bin/python bench/websocket_bench.py                  # 1,000 sockets, 20 rounds, 30 s hold
    .venv/bin/python bench/websocket_bench.py --sockets 100 --rounds 3 --hold 2 --out bench/out/ws-quick.md
"""

from __future__ import annotations

import argparse
import asyncio
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
    url: str, headers: dict[str, str], sockets: int, rounds: int, server: Server | None, hold: float
) -> dict:
    opened = time.perf_counter()
    conns: list[ClientConnection] = await asyncio.gather(
        *(connect(url, additional_headers=headers, open_timeout=60, ping_interval=None) for _ in range(sockets))
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
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to hold the sockets open, sampling RSS")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "websockets.md"))
    args = parser.parse_args()
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
    try:
        idle = gateway.rss_mb()
        direct = asyncio.run(drive(upstream.url.replace("http", "ws") + "/ws", {}, args.sockets, args.rounds, None, 0))
        print(
            f"direct: {direct['messages_per_s']:.0f} msg/s p50 {direct['p50_ms']:.1f} ms p99 {direct['p99_ms']:.1f} ms"
        )
        proxied = asyncio.run(
            drive(
                gateway.url.replace("http", "ws") + "/ws",
                {"Authorization": f"Bearer {token}"},
                args.sockets,
                args.rounds,
                gateway,
                args.hold,
            )
        )
        print(
            f"gateway: {proxied['messages_per_s']:.0f} msg/s p50 {proxied['p50_ms']:.1f} ms, "
            f"{proxied['cpu_us_per_message']:.0f} us CPU per round trip"
        )
    finally:
        gateway.stop()
        upstream.stop()
    per_socket = (proxied["rss_open"] - idle) * 1024 / args.sockets
    held = proxied["rss_held"] or [proxied["rss_after"]]
    lines = [
        f"# WebSocket benchmark, {date.today().isoformat()}",
        "",
        f"{args.sockets} concurrent sockets, {args.rounds} rounds of one 256-byte message per socket (all at once), "
        "echoed by the demo upstream; the gateway is one worker pinned to core 0 (HS256 Bearer at the handshake), "
        "the upstream and this client share core 1.",
        "",
        "| target | open all (s) | messages/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {r['open_s']:.2f} | {r['messages_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
            for name, r in (("direct", direct), ("gateway", proxied))
        ),
        "",
        f"Gateway / direct message rate: {proxied['messages_per_s'] / direct['messages_per_s']:.2f}x. "
        f"Gateway CPU per round trip (one message each way): {proxied['cpu_us_per_message']:.0f} us.",
        "",
        f"Gateway RSS: {idle:.0f} MB idle -> {proxied['rss_open']:.0f} MB with {args.sockets} sockets open "
        f"(~{per_socket:.0f} KB per socket) -> {proxied['rss_after']:.0f} MB after the rounds; held {args.hold:g} s: "
        f"{', '.join(f'{mb:.0f}' for mb in held)} MB. "
        f"Sockets still open at the end: {proxied['alive']} of {args.sockets}.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
