"""Session-mode and introspection benchmark: the cached paths beside cookie-mode JWT, in one run.

Three gateways (one worker each, pinned to core 0), the same upstream (proxy_bench's nginx 1 KB), the same
subject; every request carries a browser's cookie:

    A  cookie JWT      an HS256 access token in the access cookie, verified locally (the baseline)
    B  session         `session: {mode: server}` with Redis: the cookie holds a sealed session id, the record
                       (written before the run by gateway.sessions.ServerSessions.create, through tests/support)
                       is read from the store once, then served from the worker's cache
    C  introspection   an opaque access token in the access cookie, `tokens.introspection` pointing at a tiny
                       RFC 7662 endpoint that counts its calls; after the warm-up every request is a cache hit

Redis: REDIS_URL if set (keys under a prefix of this run's own, deleted at the end; nothing is flushed), else a
throwaway redis-server on a free port. The introspection endpoint, Redis, nginx and wrk share core 1.
Before measuring, each target is checked: 401 without its credential, 200 with it, X-Auth-User reaching the
upstream. Reported: req/s, p50, p99, gateway CPU microseconds per request (utime + stime from /proc), medians
over interleaved rounds, ratios B/A and C/A, a paired B/A and C/A (both gateways driven at once, each by its own
wrk: the ratio of their req/s is the inverse ratio of their CPU cost per request), and the introspection calls
made during the measurement.

    .venv/bin/python bench/sessions_bench.py           # full run: the "## Sessions and introspection" section
                                                       # of bench/RESULTS.md
    .venv/bin/python bench/sessions_bench.py --quick   # a few seconds per target, bench/out/RESULTS-quick.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import jwt
import redis
import yaml
from forward_auth_bench import write_section
from proxy_bench import HEALTH, HS_SECRET, PYTHON, Server, free_port, gateway_config, pinned, start, start_upstream
from proxy_bench import wrk as run_wrk
from support.redis_servers import start_redis  # proxy_bench puts tests/ on sys.path
from support.sessions import start_session

HEADING = "## Sessions and introspection"
PATH = "/app"
USER = "bench-user"
NAMES = {"A": "A cookie JWT", "B": "B session (Redis)", "C": "C introspection"}
STORE_SECRET = "bench-store-secret-0123456789abcdef"
OPAQUE = "bench-opaque-token-" + "0123456789abcdef" * 2
INTROSPECTION_CACHE = 300  # seconds an answer is reused: longer than a run's measurements

# The RFC 7662 endpoint (raw ASGI under uvicorn): POST /introspect answers every token as active for USER;
# GET /calls tells how many introspections it answered; GET /echo/... answers the X-Auth-User it was sent (the
# check that the identity reaches the upstream).
INTROSPECTION_APP = """
import json, sys, time
from urllib.parse import parse_qs
import uvicorn
CALLS = 0
ANSWER = {"active": True, "sub": %(user)r, "aud": "bench", "email": "b@example.com", "client_id": "bench",
          "scope": "read", "exp": int(time.time()) + 3600}

async def app(scope, receive, send):
    global CALLS
    if scope["type"] != "http":
        return
    form = b""
    while True:
        message = await receive()
        form += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/introspect":
        CALLS += 1
        token = parse_qs(form.decode()).get("token", [""])[0]
        body = json.dumps(ANSWER if token == %(token)r else {"active": False}).encode()
    elif path == "/calls":
        body = str(CALLS).encode()
    else:
        user = dict(scope["headers"]).get(b"x-auth-user", b"")
        body = user
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


@dataclass
class Sample:
    target: str
    connections: int
    rate: float
    p50: float
    p99: float
    cpu_us: float
    non2xx: int
    requests: int = 0


def configs(upstream: str, idp: str, store_url: str, prefix: str) -> dict[str, dict[str, Any]]:
    """The three gateways' configs: proxy_bench's HS256 config, secure cookies (the `__Host-` names a browser
    holds), plus a route to the endpoint's echo for the identity check."""

    def base() -> dict[str, Any]:
        config = gateway_config(upstream, "HS256", None)
        config["cookies"] = {"secure": True}
        config["routes"] = [{"name": "echo", "path": "/echo/", "upstream": idp}, *config["routes"]]  # type: ignore[misc]
        return config

    session = base()
    session["store"] = {"url": store_url, "key_prefix": prefix, "secret": STORE_SECRET}
    session["session"] = {"mode": "server"}
    opaque = base()
    opaque["tokens"] = {
        "audience": "bench",
        "introspection": {
            "endpoint": f"{idp}/introspect",
            "client_id": "gateway",
            "client_secret": "bench-introspection-secret",
            "cache": INTROSPECTION_CACHE,
        },
    }
    return {"A": base(), "B": session, "C": opaque}


def calls(idp: str) -> int:
    return int(httpx.get(f"{idp}/calls").text)


def check(gateways: dict[str, Server], credentials: dict[str, dict[str, str]], idp: str) -> None:
    """Each target really authenticates: 401 without its credential, 200 and the 1 KB with it, X-Auth-User at the
    upstream; and no target answers another's credential (a session cookie is no access token)."""
    for target, gateway in gateways.items():
        anonymous = httpx.get(gateway.url + PATH)
        allowed = httpx.get(gateway.url + PATH, headers=credentials[target])
        echoed = httpx.get(gateway.url + "/echo/whoami", headers=credentials[target])
        assert anonymous.status_code == 401, (target, anonymous.status_code)
        assert allowed.status_code == 200 and len(allowed.content) == 1024, (target, allowed.status_code)
        assert echoed.status_code == 200 and echoed.text == USER, (target, echoed.status_code, echoed.text)
        for other, headers in credentials.items():
            if other != target:
                refused = httpx.get(gateway.url + PATH, headers=headers)
                assert refused.status_code == 401, (target, other, refused.status_code)
    assert calls(idp) >= 1, "the introspection endpoint was never asked"


def redis_commands(url: str) -> int:
    """Commands the Redis server has processed so far (INFO stats), the INFO itself included."""
    with redis.Redis.from_url(url) as client:
        return int(client.info("stats")["total_commands_processed"])


def measure(target: str, gateway: Server, headers: dict[str, str], connections: int, secs: float) -> Sample:
    before = gateway.cpu_seconds()
    rate, p50, p99, total, non2xx = run_wrk(gateway.url + PATH, connections, secs, headers)
    cpu_us = (gateway.cpu_seconds() - before) / max(total, 1) * 1e6
    print(f"  {NAMES[target]:<18} c={connections:<4} {rate:>9.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms")
    return Sample(target, connections, rate, p50, p99, cpu_us, non2xx, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 32 connections; for CI smoke")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--connections", default="32,128")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of A, B, C; medians reported")
    parser.add_argument(
        "--paired-rounds", type=int, help="rounds of the paired B/A and C/A (default 5, 1 with --quick)"
    )
    parser.add_argument("--out", help=f"markdown file whose '{HEADING[3:]}' section is (re)written")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: install Debian's wrk (apt-get install wrk)")
    if not os.environ.get("REDIS_URL") and not shutil.which("redis-server"):
        raise SystemExit("redis-server not found: install it (apt-get install redis-server) or set REDIS_URL")
    secs = 2.0 if args.quick else args.duration
    rounds = 1 if args.quick else args.rounds
    paired_rounds = args.paired_rounds if args.paired_rounds is not None else (1 if args.quick else 5)
    conns = [32] if args.quick else [int(c) for c in args.connections.split(",")]
    out = (
        Path(args.out) if args.out else Path(__file__).parent / ("out/RESULTS-quick.md" if args.quick else "RESULTS.md")
    )

    workdir = Path(tempfile.mkdtemp(prefix="gateway-sessions-bench-"))
    prefix = f"gwbench:{os.urandom(4).hex()}:"
    claims = {"sub": USER, "aud": "bench", "roles": ["user"], "email": "b@example.com"}
    token = jwt.encode({**claims, "exp": int(time.time()) + 3600}, HS_SECRET, algorithm="HS256")
    servers: list[Server] = []
    throwaway = None
    store_url = os.environ.get("REDIS_URL", "")
    try:
        if not store_url:
            throwaway = start_redis()
            store_url = throwaway.url
            if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
                subprocess.run(["taskset", "-p", "-c", "1", str(throwaway.process.pid)], capture_output=True)
        upstream, upstream_kind = start_upstream(workdir)
        servers.append(upstream)
        (workdir / "introspection.py").write_text(INTROSPECTION_APP % {"user": USER, "token": OPAQUE})
        port = free_port()
        command = pinned(1, [PYTHON, str(workdir / "introspection.py"), str(port)])
        endpoint = start("introspection", command, f"http://127.0.0.1:{port}", "/calls", workdir)
        servers.append(endpoint)
        serve = [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--log-level", "warning"]
        gateways: dict[str, Server] = {}
        for target, config in configs(upstream.url, endpoint.url, store_url, prefix).items():
            (workdir / f"gateway-{target}.yaml").write_text(yaml.safe_dump(config))
            port = free_port()
            command = pinned(0, [*serve, "--config", str(workdir / f"gateway-{target}.yaml"), "--port", str(port)])
            gateways[target] = start(f"gateway-{target}", command, f"http://127.0.0.1:{port}", HEALTH, workdir)
            servers.append(gateways[target])
        # The session record, written with the gateway's own code and secret (as a login would write it); its
        # refresh token is never used: the access token lives an hour, no refresh endpoint is configured.
        tokens = {"access": token, "refresh": "bench-refresh-token-never-redeemed"}
        session_cookie = start_session(store_url, prefix, tokens, claims, secret=STORE_SECRET)
        credentials = {
            "A": {"Cookie": f"__Host-gw_access={token}"},
            "B": {"Cookie": session_cookie},
            "C": {"Cookie": f"__Host-gw_access={OPAQUE}"},
        }
        listening = ", ".join(f"{target} {gateway.url}" for target, gateway in gateways.items())
        print(f"upstream: {upstream_kind}; store {store_url} prefix {prefix}; {listening}")
        check(gateways, credentials, endpoint.url)
        for target, gateway in gateways.items():  # warm-up: pools, caches, lazy imports
            run_wrk(gateway.url + PATH, conns[0], min(2.0, secs), credentials[target])
        asked, commands = calls(endpoint.url), redis_commands(store_url)
        samples: dict[tuple[str, int], list[Sample]] = {}
        for number in range(rounds):
            print(f"round {number + 1} of {rounds}")
            for target, gateway in gateways.items():
                for c in conns:
                    sample = measure(target, gateway, credentials[target], c, secs)
                    samples.setdefault((target, c), []).append(sample)
        paired_lines, served = (
            paired(gateways, credentials, conns, min(secs, 5.0), paired_rounds) if paired_rounds else ([], {})
        )
        asked, commands = calls(endpoint.url) - asked, redis_commands(store_url) - commands
        for (target, _), group in samples.items():
            served[target] = served.get(target, 0) + sum(s.requests for s in group)
        rss = {target: gateway.rss_mb() for target, gateway in gateways.items()}
    finally:
        for server in servers:
            server.stop()
        if throwaway is not None:
            throwaway.stop()
        elif store_url:  # someone else's Redis: only this run's keys go
            with redis.Redis.from_url(store_url) as client:
                for key in client.scan_iter(match=f"{prefix}*"):
                    client.delete(key)
    shared = "" if throwaway else " (REDIS_URL: counts every client of that server)"
    report(samples, conns, paired_lines, (asked, commands, shared), served, rss, out, upstream_kind, secs, rounds)


def paired(
    gateways: dict[str, Server], credentials: dict[str, dict[str, str]], conns: list[int], secs: float, rounds: int
) -> tuple[list[str], dict[str, int]]:
    """B beside A, then C beside A, each pair at the same time under two wrks: both gateways on core 0, so the
    ratio of their req/s is the inverse ratio of their CPU cost per request."""
    lines: list[str] = []
    served: dict[str, int] = {}
    with ThreadPoolExecutor(2) as pool:
        for target in ("B", "C"):
            for connections in conns:
                ratios = []
                for _ in range(rounds):
                    a = pool.submit(run_wrk, gateways["A"].url + PATH, connections, secs, credentials["A"])
                    other = pool.submit(run_wrk, gateways[target].url + PATH, connections, secs, credentials[target])
                    ratios.append(other.result()[0] / a.result()[0])
                    served[target] = served.get(target, 0) + other.result()[3]
                print(f"  paired     {target} / A    c={connections:<4} " + ", ".join(f"{r:.3f}" for r in ratios))
                lines.append(
                    f"Paired {target} / A at {connections} connections: median **{statistics.median(ratios):.2f}** "
                    f"over {rounds} round{'s' if rounds != 1 else ''} of {secs:g} s "
                    f"({', '.join(f'{r:.2f}' for r in ratios)})"
                )
    return lines, served


def report(
    samples: dict[tuple[str, int], list[Sample]],
    conns: list[int],
    paired_lines: list[str],
    calls: tuple[int, int, str],
    served: dict[str, int],
    rss: dict[str, float],
    out: Path,
    upstream_kind: str,
    secs: float,
    rounds: int,
) -> None:
    def med(target: str, c: int) -> Sample:
        group = samples[(target, c)]
        return Sample(
            target,
            c,
            statistics.median(s.rate for s in group),
            statistics.median(s.p50 for s in group),
            statistics.median(s.p99 for s in group),
            statistics.median(s.cpu_us for s in group),
            sum(s.non2xx for s in group),
        )

    command = " ".join(["bench/sessions_bench.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        f"{HEADING}, {date.today()}",
        "",
        f"`.venv/bin/python {command}`. Upstream: {upstream_kind}. Every request carries a browser's cookie for "
        "the same subject. **A**: an HS256 access token in `__Host-gw_access`, verified locally (the baseline). "
        "**B**: `session: {mode: server}` with Redis; `__Host-gw_session` holds the sealed id of a record "
        "written before the run with `ServerSessions.create`; the cached lookup path. **C**: an opaque token in "
        f"`__Host-gw_access`, `tokens.introspection` (`cache: {INTROSPECTION_CACHE}`) pointing at a raw-ASGI "
        "RFC 7662 endpoint that counts its calls; after the warm-up every request is a cache hit. One worker "
        "per gateway, pinned to core 0; wrk, nginx, Redis and the endpoint on core 1. Checked first: 401 without "
        f"the credential, 200 with it, X-Auth-User at the upstream. {secs:g} s per measurement after a warm-up, "
        f"{rounds} interleaved round{'s' if rounds != 1 else ''} (each measures A, B and C once), medians. "
        "CPU µs/req: the gateway's utime + stime per request.",
        "",
        "| target | conns | req/s | p50 ms | p99 ms | gateway CPU µs/req | RSS MB | non-2xx | × A |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target in ("A", "B", "C"):
        for c in conns:
            row, a = med(target, c), med("A", c)
            lines.append(
                f"| {NAMES[target]} | {c} | {row.rate:,.0f} | {row.p50:.2f} | {row.p99:.2f} | {row.cpu_us:.0f} | "
                f"{rss[target]:.0f} | {row.non2xx} | {row.rate / a.rate:.2f} |"
            )
    lines.append("")
    for target in ("B", "C"):
        for c in conns:
            per_round = zip(samples[(target, c)], samples[("A", c)], strict=True)
            lines.append(
                f"Per-round {target} / A at {c} connections: "
                + ", ".join(f"{x.rate / a.rate:.2f}" for x, a in per_round)
            )
    if paired_lines:
        lines += [
            "",
            *paired_lines,
            "",
            "Paired: the two gateways driven at the same time, each by its own wrk; both on core 0, so the ratio "
            "of their req/s is the inverse ratio of their CPU cost per request.",
        ]
    asked, commands, shared = calls
    lines += [
        "",
        "Introspection calls during the measurement (the rounds and the paired runs, after the warm-up): "
        f"**{asked}**, for {served['C']:,} requests of C (an answer is kept {INTROSPECTION_CACHE} s, or until the "
        "token's exp).",
        "",
        f"Redis commands during the measurement{shared}: **{commands:,}**, for {served['B']:,} requests of B "
        "(session reads when a use is due to be recorded, at most once a minute; the denylist's sync with the "
        "store; this count's own INFO).",
    ]
    write_section(out, lines, HEADING)
    print("\n".join(lines))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
