"""Issue 17: the gateway's CPU per request against the Python ASGI floor and the usual proxies, in one run.

Every proxy runs on core 0 (taskset), one process, one worker; wrk and the upstream (nginx, 1 KB; /1m a 1 MB
file) share core 1, as in proxy_bench. The figure that matters is the **CPU time of the proxy's process per
request** (utime + stime from /proc over a wrk run, divided by the requests wrk counted), as a ratio to the
floor's: a Starlette app on uvicorn answering 1 KB itself with the gateway's server options. Each target is
measured once per round, the rounds interleaved, medians reported. Requests carry an HS256 Bearer token;
proxies that authenticate send X-Auth-User upstream.

    table   HAProxy jwt_verify (when installed) | nginx proxy_pass | the floor | gateway, access log off / on |
            gateway 401 without a token | gateway, a refresh served from the grace cache |
            the plain aiohttp forwarder (raw ASGI + PyJWT + aiohttp, bench/baselines/aiohttp_forwarder.py)
    bodies  POST 64 KB and GET 1 MB: direct, through nginx, through the gateway (req/s as a ratio to direct)
    workers gateway --workers 2 (not pinned) against one worker
    store   a gateway with a Redis store: Redis commands per proxied request and per grace hit

    .venv/bin/python bench/floor_bench.py                     # the top section of bench/RESULTS.md
    .venv/bin/python bench/floor_bench.py --quick             # 1 s per target, no warm-up: bench/out/
    .venv/bin/python bench/floor_bench.py --forwarder lean    # server.forwarder for every gateway
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import yaml
from proxy_bench import (
    HEALTH,
    HS_SECRET,
    PYTHON,
    ROOT,
    Server,
    free_port,
    gateway_config,
    pinned,
    start,
    start_upstream,
    wrk,
)
from targets import GraceSetup, haproxy_version, start_haproxy, start_nginx_proxy

HEADING = "# Proxy overhead against the Python ASGI floor"
CONNECTIONS = 32
POST_64K = """wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
"""

FLOOR_BODIES = {"post": "Starlette floor (reads the body, answers 1 KB)", "get": "Starlette floor (1 MB from memory)"}


@dataclass
class Case:
    """One thing wrk drives: a server, a path, headers, maybe a Lua script; `prepare` runs before each run
    (the grace case primes a fresh refresh there) and returns extra headers."""

    key: str
    label: str
    server: Server
    path: str = "/app"
    headers: dict[str, str] = field(default_factory=dict)
    script: Path | None = None
    prepare: Callable[[], dict[str, str]] | None = None


@dataclass
class Sample:
    rate: float
    p50: float
    p99: float
    cpu_us: float
    requests: int
    non2xx: int
    redis: int | None = None  # Redis commands during the run (store cases)
    others_us: float = 0.0  # CPU µs per request of wrk and the upstream (core 1)


def run(case: Case, secs: float, grace: GraceSetup | None, upstream: Server) -> Sample:
    headers = dict(case.headers)
    if case.prepare is not None:
        headers.update(case.prepare())
    counting = grace is not None and case.server is grace.gateway
    commands = grace.redis_commands() if grace is not None and counting else 0
    calls = grace.idp_calls() if grace is not None and counting else 0
    cpu, theirs, load = case.server.cpu_seconds(), upstream.cpu_seconds(), children_cpu()
    rate, p50, p99, total, non2xx = wrk(case.server.url + case.path, CONNECTIONS, secs, headers, case.script)
    cpu_us = (case.server.cpu_seconds() - cpu) / max(total, 1) * 1e6
    others = upstream.cpu_seconds() - theirs + children_cpu() - load if case.server is not upstream else 0.0
    redis = None
    if grace is not None and counting:
        redis = grace.redis_commands() - commands - 1  # less this count's own INFO
        if grace.idp_calls() != calls:
            raise RuntimeError(f"{case.label}: the IdP was called during the run; not a grace-cache measurement")
    print(f"  {case.label:<46} {rate:>9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  {cpu_us:6.0f} µs CPU/req")
    return Sample(rate, p50, p99, cpu_us, total, non2xx, redis, others / max(total, 1) * 1e6)


def children_cpu() -> float:
    """CPU seconds of this process's finished children: wrk's (and taskset's) once each run is over."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median(group: list[Sample]) -> Sample:
    redis = [s.redis for s in group if s.redis is not None]
    return Sample(
        statistics.median(s.rate for s in group),
        statistics.median(s.p50 for s in group),
        statistics.median(s.p99 for s in group),
        statistics.median(s.cpu_us for s in group),
        sum(s.requests for s in group),
        sum(s.non2xx for s in group),
        sum(redis) if redis else None,
        statistics.median(s.others_us for s in group),
    )


def check(case: Case, expected: int) -> None:
    """The target answers as it should before it is measured (auth really is on the path)."""
    import httpx

    headers = dict(case.headers)
    if case.prepare is not None:
        headers.update(case.prepare())
    if case.script is not None:  # the POST cases
        answer = httpx.post(case.server.url + case.path, headers=headers, content=b"x" * 65536, timeout=10)
    else:
        answer = httpx.get(case.server.url + case.path, headers=headers, timeout=10)
    if answer.status_code != expected:
        raise RuntimeError(f"{case.label}: {answer.status_code} where {expected} was expected: {answer.text[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s per target, 1 round, no warm-up; for CI smoke")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--forwarder", choices=["lean", "aiohttp"], help="server.forwarder for every gateway")
    parser.add_argument("--out", help="markdown file (default bench/RESULTS.md, or bench/out/ with --quick)")
    parser.add_argument(
        "--only", help="comma-separated case keys (e.g. get-direct,get-gateway): measured and printed, nothing written"
    )
    args = parser.parse_args()
    secs = 1.0 if args.quick else args.duration
    rounds = 1 if args.quick else args.rounds
    out = Path(args.out) if args.out else ROOT / "bench" / ("out/RESULTS-quick.md" if args.quick else "RESULTS.md")
    extra_server: dict[str, Any] = {"forwarder": args.forwarder} if args.forwarder else {}

    workdir = Path(tempfile.mkdtemp(prefix="gateway-floor-bench-"))
    claims = {"sub": "bench-user", "aud": "bench", "exp": int(time.time()) + 3600}
    bearer = {"Authorization": f"Bearer {jwt.encode(claims, HS_SECRET, algorithm='HS256')}"}
    load_before = os.getloadavg()
    servers: list[Server] = []
    grace: GraceSetup | None = None
    notes: list[str] = []
    try:
        upstream, upstream_kind = start_upstream(workdir)
        servers.append(upstream)

        def launch(name: str, command: list[str], ready: str = "/", pin: bool = True) -> Server:
            port = free_port()
            command = [*command, "--port", str(port)]
            server = start(name, pinned(0, command) if pin else command, f"http://127.0.0.1:{port}", ready, workdir)
            servers.append(server)
            return server

        def gateway(name: str, access_log: bool, workers: int = 1) -> Server:
            config = gateway_config(upstream.url, "HS256", None)
            config["server"] = {"access_log": access_log, **extra_server}
            path = workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            serve = [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--log-level", "warning"]
            return launch(name, [*serve, "--config", str(path), "--workers", str(workers)], HEALTH, workers == 1)

        floor = launch("floor", [PYTHON, "bench/baselines/starlette_floor.py"])
        quiet, logging = gateway("gateway", False), gateway("gateway-log", True)
        plain = launch(
            "plain",
            [
                PYTHON,
                "bench/baselines/aiohttp_forwarder.py",
                "--upstream",
                upstream.url,
                "--hs256-secret",
                HS_SECRET,
                "--audience",
                "bench",
            ],
        )
        nginx = start_nginx_proxy(workdir, upstream.url)
        servers.append(nginx)
        haproxy = start_haproxy(workdir, upstream.url, HS_SECRET, "bench")
        if haproxy is None:
            notes.append("HAProxy: not installed, row skipped.")
        else:
            servers.append(haproxy)
        grace = GraceSetup(workdir, upstream.url, extra_server)
        assert grace.gateway is not None
        servers.append(grace.gateway)
        grace_bearer = jwt.encode({**claims, "aud": "legacy-app"}, "bench-idp-hs256-secret-0123456789abcdef")
        two = gateway("gateway×2", False, workers=2)

        post = workdir / "post64k.lua"
        post.write_text(POST_64K)
        table = [
            *(
                [Case("haproxy", f"HAProxy {haproxy_version()} jwt_verify HS256 + header", haproxy, headers=bearer)]
                if haproxy
                else []
            ),
            Case("nginx", "nginx proxy_pass (no auth)", nginx),
            Case("floor", "Starlette on uvicorn answering 1 KB itself", floor),
            Case("quiet", "gateway, access log off", quiet, headers=bearer),
            Case("logging", "gateway, access log on (the default)", logging, headers=bearer),
            Case("denied", "gateway, 401 no token (denied)", quiet),
            Case("grace", "gateway, refresh hit from the grace cache", grace.gateway, prepare=grace.prime),
            Case("plain", "plain aiohttp forwarder (PyJWT, X-Auth-User)", plain, headers=bearer),
        ]
        extra = [
            Case("direct", "nginx upstream direct", upstream),
            Case(
                "store",
                "gateway with a Redis store, HS256 bearer",
                grace.gateway,
                headers={"Authorization": f"Bearer {grace_bearer}"},
            ),
            Case("two", "gateway --workers 2 (not pinned)", two, headers=bearer),
            Case("post-direct", "POST 64 KB direct", upstream, script=post),
            Case("post-nginx", "POST 64 KB through nginx", nginx, script=post),
            Case("post-gateway", "POST 64 KB through the gateway", quiet, headers=bearer, script=post),
            Case("post-floor", "POST 64 KB read whole by the Starlette floor", floor, path="/read", script=post),
            Case("get-direct", "GET 1 MB direct", upstream, path="/1m"),
            Case("get-nginx", "GET 1 MB through nginx", nginx, path="/1m"),
            Case("get-gateway", "GET 1 MB through the gateway", quiet, path="/1m", headers=bearer),
            Case("get-floor", "GET 1 MB from the Starlette floor's memory", floor, path="/1m"),
        ]
        cases = table + extra
        if args.only:
            cases = [case for case in cases if case.key in args.only.split(",")]
        for case in cases:
            check(case, 401 if case.key == "denied" else 200)
        for case in [c for c in cases if c.key in ("haproxy", "plain")]:
            check(Case(case.key, case.label + " without a token", case.server), 401)
        if not args.quick:
            print("warm-up")
            for case in cases:
                run(case, min(2.0, secs), grace, upstream)
        samples: dict[str, list[Sample]] = {}
        for number in range(rounds):
            print(f"round {number + 1} of {rounds}")
            for case in cases:
                samples.setdefault(case.key, []).append(run(case, secs, grace, upstream))
    finally:
        for server in servers:
            server.stop()
        if grace is not None:
            grace.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {key: median(group) for key, group in samples.items()}
    if args.only:
        return
    lines = report(cases, medians, samples, upstream_kind, secs, rounds, load_before, notes, args)
    write_top(out, lines)
    print("\n".join(lines))
    print(f"\nwritten to {out}")


def report(
    cases: list[Case],
    medians: dict[str, Sample],
    samples: dict[str, list[Sample]],
    upstream_kind: str,
    secs: float,
    rounds: int,
    load_before: tuple[float, float, float],
    notes: list[str],
    args: argparse.Namespace,
) -> list[str]:
    floor = medians["floor"].cpu_us
    goals = {"quiet": 2.5, "logging": 2.5, "denied": 1.2, "grace": 3.0}
    load_after = os.getloadavg()
    command = " ".join(["bench/floor_bench.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        f"{HEADING}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"`.venv/bin/python {command}`{'' if args.forwarder else ' (server.forwarder not set: the default)'}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; load average {load_before[0]:.2f} before the run, "
        f"{load_after[0]:.2f} after (1 min; other jobs share the machine). Upstream: {upstream_kind}. "
        f"Each proxy pinned to core 0, one process, one worker; wrk (1 thread, {CONNECTIONS} connections) and the "
        f"upstream on core 1. {secs:g} s per measurement{' after a warm-up' if not args.quick else ''}, {rounds} "
        "interleaved rounds (each round "
        "measures every target once), medians. **CPU µs / request**: utime + stime of the proxy's process over a "
        "wrk run, divided by the requests wrk counted. HS256 Bearer token; proxies that authenticate send "
        "X-Auth-User.",
        "",
        "| target | CPU µs / request | relative to the Starlette floor | goal | req/s | p50 ms | p99 ms | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        if case.key not in ("haproxy", "nginx", "floor", "quiet", "logging", "denied", "grace", "plain"):
            continue
        s = medians[case.key]
        goal = goals.get(case.key)
        verdict = f"≤ {goal:g}× ({'met' if s.cpu_us / floor <= goal else 'missed'})" if goal else ""
        lines.append(
            f"| {case.label} | {s.cpu_us:.0f} | {s.cpu_us / floor:.2f} | {verdict} | {s.rate:,.0f} | {s.p50:.2f} | "
            f"{s.p99:.2f} | {s.non2xx} |"
        )
    lines += ["", *per_round(samples, floor_key="floor")]

    def ratio(key: str, base: str) -> float:
        return medians[key].rate / medians[base].rate

    lines += [
        "",
        "Bodies: req/s as a ratio to nginx serving the same request directly (wrk to the upstream on core 1).",
        "",
        "| case | target | req/s | × direct | CPU µs / request | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in (("post", "POST 64 KB"), ("get", "GET 1 MB")):
        for target, name in (
            ("direct", "direct (nginx upstream)"),
            ("nginx", "nginx proxy_pass"),
            ("gateway", "gateway"),
            (
                "floor",
                "Starlette floor (" + ("reads the body, answers 1 KB" if kind == "post" else "1 MB from memory") + ")",
            ),
        ):
            s = medians[f"{kind}-{target}"]
            lines.append(
                f"| {label} | {name} | {s.rate:,.0f} | {ratio(f'{kind}-{target}', f'{kind}-direct'):.2f} | "
                f"{s.cpu_us:.0f} | {s.p99:.2f} |"
            )
    for kind, label in (("post", "POST 64 KB"), ("get", "GET 1 MB")):
        nginx_r, ours = ratio(f"{kind}-nginx", f"{kind}-direct"), ratio(f"{kind}-gateway", f"{kind}-direct")
        verdict = "met" if nginx_r / ours <= 1.5 else "missed"
        floor_r = ratio(f"{kind}-floor", f"{kind}-direct")
        lines.append(
            f"\n{label}: nginx at {nginx_r:.2f}× direct, the gateway at {ours:.2f}×: nginx's ratio is "
            f"**{nginx_r / ours:.2f}×** the gateway's (goal ≤ 1.5×, {verdict}). The Starlette floor, which forwards "
            f"nothing, is at {floor_r:.2f}× direct: nginx's ratio is {nginx_r / floor_r:.2f}× the floor's."
            + (
                f" A POST costs the gateway at least what a bodiless GET does: with the body free, its rate would be "
                f"the 1 KB GET's ({medians['quiet'].rate:,.0f} req/s, log off), and nginx's ratio would still be "
                f"{medians['post-nginx'].rate / medians['quiet'].rate:.2f}× the gateway's."
                if kind == "post"
                else ""
            )
        )
    direct = medians["direct"]
    lines += [
        "",
        f"For scale: nginx serving the 1 KB itself (wrk straight to the upstream, both on core 1): {direct.rate:,.0f} "
        f"req/s, {direct.cpu_us:.0f} µs of nginx CPU per request.",
    ]
    two, one = medians["two"], medians["quiet"]
    bound = 2e6 / (one.cpu_us + one.others_us)  # req/s two cores carry with the gateway, wrk and nginx on them
    store, grace = medians["store"], medians["grace"]
    lines += [
        "",
        f"Workers: `--workers 2` (not pinned, sharing both cores with wrk and nginx) did **{two.rate:,.0f}** req/s "
        f"against {one.rate:,.0f} for one worker pinned to core 0: **×{two.rate / one.rate:.2f}** (goal ≥ 1.8×). "
        f"CPU per request, all processes: {two.cpu_us:.0f} µs with two workers, {one.cpu_us:.0f} µs with one "
        f"(×{two.cpu_us / one.cpu_us:.2f}). wrk and the nginx upstream need {one.others_us:.0f} µs per request "
        f"themselves, so two cores carry at most {bound:,.0f} req/s here: **×{bound / one.rate:.2f}** one worker's "
        f"rate is the most `--workers 2` can show on this machine; it reached {two.rate / bound:.0%} of that.",
        "",
        f"p99 at {CONNECTIONS} connections: gateway (log off) **{one.p99:.2f} ms**, (log on) "
        f"{medians['logging'].p99:.2f} ms, against the plain aiohttp forwarder's **{medians['plain'].p99:.2f} ms**.",
        "",
        f"Redis on the hot path (a gateway with `store: redis://`): {per_request(store)} per proxied HS256 "
        f"request ({store.redis} for {store.requests:,} requests, the denylist's once-a-second sync included), "
        f"{per_request(grace)} per grace-cache hit ({grace.redis} for {grace.requests:,}). The IdP was called once "
        "per round (the priming refresh) and never during a grace measurement.",
    ]
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        "The sections below are earlier runs of the other benchmarks (`scripts/bench`), each dated in its heading.",
    ]
    return lines


def per_request(sample: Sample) -> str:
    return f"{(sample.redis or 0) / max(sample.requests, 1):.3f} commands"


def per_round(samples: dict[str, list[Sample]], floor_key: str) -> list[str]:
    lines = []
    for key, label in (("quiet", "log off"), ("logging", "log on"), ("denied", "denied"), ("grace", "grace hit")):
        pairs = zip(samples[key], samples[floor_key], strict=True)
        lines.append(
            f"Per-round {label} / floor (CPU µs): " + ", ".join(f"{a.cpu_us / b.cpu_us:.2f}" for a, b in pairs)
        )
    return lines


def write_top(out: Path, lines: list[str]) -> None:
    """This benchmark's section goes first in ``out``, above the sections the other benchmarks write (## ...)."""
    text = out.read_text() if out.exists() else ""
    if text.startswith(HEADING):
        following = text.find("\n## ")
        text = text[following + 1 :] if following >= 0 else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n\n" + text.lstrip("\n"))


if __name__ == "__main__":
    main()
