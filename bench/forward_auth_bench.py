"""Forward-auth benchmark: nginx asking the gateway (auth_request) against nginx proxying through it, in one run.

Five targets behind nginx, the same upstream (proxy_bench's nginx 1 KB) and the same HS256 Bearer token:

    A  forward-auth   nginx auth_request to `gateway serve` at /.gateway/auth, then nginx proxy_pass to the
                      upstream: the server block of docs/forward-auth.md, read from the page as the tests do
    D  kept answers   A with the page's "answer kept for a second" lines (a second nginx, asking A's gateway)
    B  proxy mode     nginx proxy_pass to `gateway serve`, which verifies and forwards to the upstream
    C  no auth        nginx proxy_pass to the upstream (the reference: what auth costs at all)
    F  Python floor   nginx proxy_pass to bench/baselines/starlette_floor.py (Starlette on uvicorn with the
                      gateway's server options) answering 1 KB itself: what any Python ASGI process costs per
                      request; A's gateway CPU is set against it

B and C are servers added next to the documented one, with the same upstream keepalive and proxy headers.
A and B ask gateways of their own (same config, one worker each), so that the paired measure can run both at
once. The proxy tier (the gateways and the front nginx) is pinned to core 0; wrk and the upstream share core 1,
as in proxy_bench. Reported: req/s, p50, p99, CPU microseconds per request of the gateway and of the front
nginx (utime + stime from /proc), medians over interleaved rounds, and a paired A/B ratio (A and B driven at
the same time, each by its own wrk).

    .venv/bin/python bench/forward_auth_bench.py           # full run: the "## Forward-auth" section of bench/RESULTS.md
    .venv/bin/python bench/forward_auth_bench.py --quick   # a few seconds per target, bench/out/RESULTS-quick.md
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import httpx
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
    write_section,
)
from proxy_bench import wrk as run_wrk
from support.frontproxies import FrontProxy, snippet  # proxy_bench puts tests/ on sys.path

HEADING = "## Forward-auth"
PATH = "/app"
NAMES = {
    "A": "A forward-auth",
    "D": "D kept answers",
    "B": "B proxy mode",
    "C": "C no auth",
    "F": "F Python floor",
}


def start_floor(workdir: Path) -> Server:
    """The Python ASGI floor (bench/baselines/starlette_floor.py, as floor_bench runs it), one process, core 0."""
    port = free_port()
    command = pinned(0, [PYTHON, "bench/baselines/starlette_floor.py", "--port", str(port)])
    return start("floor", command, f"http://127.0.0.1:{port}", "/", workdir)


class Front(FrontProxy):
    """nginx with the documented forward-auth server (A), plus a plain proxy_pass to a second gateway (B) and to
    the app (C); pinned to core 0 with the gateways."""

    def __init__(
        self, gateway: str, proxied: str, app: str, floor: str, keepalive: int | None = None, kind: str = "nginx"
    ) -> None:
        super().__init__(kind, gateway, app)
        self.proxied, self.floor, self.keepalive = proxied, floor, keepalive
        self.pool = "-"  # the upstream blocks' keepalive, as run
        self.ports: dict[str, int] = {}

    def _config(self, port: int) -> list[str]:
        command = super()._config(port)
        documented = re.search(r"keepalive (\d+);", snippet("nginx"))
        keepalive = self.keepalive or (documented.group(1) if documented else None)
        pool = f"keepalive {keepalive};" if keepalive else ""
        self.pool = f"{keepalive or 'none'}{'' if self.keepalive else ' (as documented)'}"
        self.ports = {"B": free_port(), "C": free_port(), "F": free_port()}
        forward = (
            "proxy_set_header Host $http_host; proxy_set_header X-Forwarded-Proto $scheme;"
            " proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
            ' proxy_http_version 1.1; proxy_set_header Connection "";'
        )
        extra = (
            f"upstream proxied {{ server {self.proxied}; {pool} }}\n"
            f"server {{ listen 127.0.0.1:{self.ports['B']}; location / {{ proxy_pass http://proxied; {forward} }} }}\n"
            f"server {{ listen 127.0.0.1:{self.ports['C']}; location / {{ proxy_pass http://app; {forward} }} }}\n"
            f"upstream floor {{ server {self.floor}; {pool} }}\n"
            f"server {{ listen 127.0.0.1:{self.ports['F']}; location / {{ proxy_pass http://floor; {forward} }} }}\n"
        )
        conf = self.dir / "nginx.conf"
        text = conf.read_text()
        # The error log at info level (the tests read it) would log every client's keepalive close under load.
        text = text.replace("error.log info;", "error.log warn;")
        if self.keepalive:  # --keepalive: the documented upstream blocks with another idle-connection pool
            text = re.sub(r"keepalive \d+;", pool, text)
        conf.write_text(text[: text.rstrip().rfind("}")] + extra + "}\n")
        return pinned(0, command)


@dataclass
class Sample:
    target: str
    connections: int
    rate: float
    p50: float
    p99: float
    gateway_us: float | None
    nginx_us: float
    non2xx: int


def measure(
    target: str, url: str, gateway: Server | None, front: Server, connections: int, secs: float, token: str
) -> Sample:
    before = [s.cpu_seconds() for s in (gateway, front) if s is not None]
    rate, p50, p99, total, non2xx = run_wrk(url + PATH, connections, secs, {"Authorization": f"Bearer {token}"})
    after = [s.cpu_seconds() for s in (gateway, front) if s is not None]
    per = [(b - a) / max(total, 1) * 1e6 for a, b in zip(before, after, strict=True)]
    sample = Sample(target, connections, rate, p50, p99, per[0] if gateway else None, per[-1], non2xx)
    print(f"  {NAMES[target]:<16} c={connections:<4} {rate:>9.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms")
    return sample


def check(urls: dict[str, str], gateway: Server, token: str) -> None:
    """Auth is really on the path of A and B: 401 without the token, 200 and the 1 KB with it; the gateway's
    answer to nginx carries the identity."""
    bearer = {"Authorization": f"Bearer {token}"}
    for target, url in urls.items():
        anonymous, allowed = httpx.get(url + PATH), httpx.get(url + PATH, headers=bearer)
        assert allowed.status_code == 200 and len(allowed.content) == 1024, (target, allowed.status_code)
        assert anonymous.status_code == (200 if target in "CF" else 401), (target, anonymous.status_code)
    asked = httpx.get(gateway.url + "/.gateway/auth", headers={**bearer, "X-Original-URI": PATH})
    assert asked.status_code == 200 and asked.headers["x-auth-user"] == "bench-user", asked.headers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 32 connections; for CI smoke")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--connections", default="32,128")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every target; medians reported")
    parser.add_argument(
        "--paired-rounds", type=int, help="rounds of the paired A/B measure (default 5, 1 with --quick)"
    )
    parser.add_argument(
        "--keepalive", type=int, help="nginx's idle connections per upstream (default: the docs' snippet's value)"
    )
    parser.add_argument("--out", help="markdown file whose '## Forward-auth' section is (re)written")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: install Debian's wrk (apt-get install wrk)")
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        raise SystemExit("nginx not found: forward-auth is measured behind nginx (apt-get install nginx-light)")
    secs = 2.0 if args.quick else args.duration
    rounds = 1 if args.quick else args.rounds
    paired_rounds = args.paired_rounds if args.paired_rounds is not None else (1 if args.quick else 5)
    conns = [32] if args.quick else [int(c) for c in args.connections.split(",")]
    out = Path(args.out) if args.out else ROOT / "bench" / ("out/RESULTS-quick.md" if args.quick else "RESULTS.md")

    workdir = Path(tempfile.mkdtemp(prefix="gateway-fa-bench-"))
    claims = {"sub": "bench-user", "aud": "bench", "roles": ["user"], "email": "b@example.com"}
    token = jwt.encode({**claims, "exp": int(time.time()) + 3600}, HS_SECRET, algorithm="HS256")
    servers: list[Server] = []
    fronts: list[Front] = []
    try:
        upstream, upstream_kind = start_upstream(workdir)
        servers.append(upstream)
        config = gateway_config(upstream.url, "HS256", None)
        config["server"] = {**config["server"], "trusted_proxies": ["127.0.0.1"]}  # type: ignore[dict-item]
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        serve = [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--log-level", "warning"]
        gateways = {}
        for target in ("A", "B"):
            port = free_port()
            command = pinned(0, [*serve, "--config", str(workdir / "gateway.yaml"), "--port", str(port)])
            gateways[target] = start(f"gateway-{target}", command, f"http://127.0.0.1:{port}", HEALTH, workdir)
            servers.append(gateways[target])
        floor = start_floor(workdir)
        servers.append(floor)
        netloc = {
            name: server.url.removeprefix("http://")
            for name, server in {**gateways, "up": upstream, "floor": floor}.items()
        }
        for kind in ("nginx", "nginx-cached"):
            fronts.append(Front(netloc["A"], netloc["B"], netloc["up"], netloc["floor"], args.keepalive, kind).start())
        front, kept = fronts
        nginx = {
            name: Server(f"{kind.kind}-front", kind.process, kind.url) for name, kind in zip("AD", fronts, strict=True)
        }  # type: ignore[arg-type]
        urls = {
            "A": front.url,
            "D": kept.url,
            "B": f"http://127.0.0.1:{front.ports['B']}",
            "C": f"http://127.0.0.1:{front.ports['C']}",
            "F": f"http://127.0.0.1:{front.ports['F']}",
        }
        print(f"upstream: {upstream_kind}; " + ", ".join(f"{name} {url}" for name, url in urls.items()))
        check(urls, gateways["A"], token)
        asked = {**gateways, "D": gateways["A"], "F": floor}
        for url in urls.values():  # warm-up: pools, caches, lazy imports
            run_wrk(url + PATH, conns[0], min(2.0, secs), {"Authorization": f"Bearer {token}"})
        samples: dict[tuple[str, int], list[Sample]] = {}
        for number in range(rounds):
            print(f"round {number + 1} of {rounds}")
            for target, url in urls.items():
                for c in conns:
                    server = nginx["D" if target == "D" else "A"]
                    sample = measure(target, url, asked.get(target), server, c, secs, token)
                    samples.setdefault((target, c), []).append(sample)
        paired_lines = paired(urls, conns, min(secs, 5.0), paired_rounds, token) if paired_rounds else []
    finally:
        for each in fronts:
            each.stop()
        for server in servers:
            server.stop()
    report(
        samples, conns, paired_lines, out, f"{upstream_kind}; nginx upstream keepalive {fronts[0].pool}", secs, rounds
    )


def paired(urls: dict[str, str], conns: list[int], secs: float, rounds: int, token: str) -> list[str]:
    """A and B at the same time, each under its own wrk: their gateways share core 0 (with the front nginx), so
    the ratio of their req/s is the inverse ratio of the gateways' CPU cost per request, and drift on the
    machine hits both at the same instant."""
    bearer = {"Authorization": f"Bearer {token}"}
    lines = []
    with ThreadPoolExecutor(2) as pool:
        for connections in conns:
            ratios = []
            for _ in range(rounds):
                a = pool.submit(run_wrk, urls["A"] + PATH, connections, secs, bearer)
                b = pool.submit(run_wrk, urls["B"] + PATH, connections, secs, bearer)
                ratios.append(a.result()[0] / b.result()[0])
            print(f"  paired     A / B    c={connections:<4} " + ", ".join(f"{r:.3f}" for r in ratios))
            lines.append(
                f"Paired A / B at {connections} connections: median **{statistics.median(ratios):.2f}** over "
                f"{rounds} round{'s' if rounds != 1 else ''} of {secs:g} s ({', '.join(f'{r:.2f}' for r in ratios)})"
            )
    return lines


def report(
    samples: dict[tuple[str, int], list[Sample]],
    conns: list[int],
    paired_lines: list[str],
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
            statistics.median(s.gateway_us for s in group) if group[0].gateway_us is not None else None,
            statistics.median(s.nginx_us for s in group),
            sum(s.non2xx for s in group),
        )

    command = " ".join(["bench/forward_auth_bench.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        f"{HEADING}, {date.today()}",
        "",
        f"`.venv/bin/python {command}`. Upstream: {upstream_kind}; HS256 Bearer token, identity headers "
        "X-Auth-User, -Email, -Roles. **A**: nginx `auth_request` to the gateway's `/.gateway/auth`, then nginx "
        "`proxy_pass` to the upstream (the nginx block of docs/forward-auth.md, as the tests run it). **D**: A with "
        "the page's lines that keep the gateway's 200s for a second (a second nginx asking A's gateway). **B**: "
        "nginx `proxy_pass` to the gateway in proxy mode, which forwards to the upstream. **C**: nginx `proxy_pass` "
        "to the upstream, no auth. **F**: nginx `proxy_pass` to Starlette on uvicorn (uvloop, httptools, no access "
        "log) answering 1 KB itself, the Python ASGI floor. One process each for the gateways and F; they and the "
        f"front nginx pinned to core 0, wrk and the upstream on core 1. {secs:g} s per measurement after a warm-up, "
        f"{rounds} interleaved round{'s' if rounds != 1 else ''} (each measures every target once), medians. CPU "
        "µs/req: utime + stime per request of the Python process asked (the gateway, or F's app) and of the front "
        "nginx.",
        "",
        "| target | conns | req/s | p50 ms | p99 ms | Python CPU µs/req | nginx CPU µs/req | non-2xx | × B | × C |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target in NAMES:
        for c in conns:
            row, b, base = med(target, c), med("B", c), med("C", c)
            gateway_us = f"{row.gateway_us:.0f}" if row.gateway_us is not None else "-"
            lines.append(
                f"| {NAMES[target]} | {c} | {row.rate:,.0f} | {row.p50:.2f} | {row.p99:.2f} | {gateway_us} | "
                f"{row.nginx_us:.0f} | {row.non2xx} | {row.rate / b.rate:.2f} | {row.rate / base.rate:.2f} |"
            )
    lines.append("")
    for c in conns:
        a, d, b, f = med("A", c), med("D", c), med("B", c), med("F", c)
        assert a.gateway_us is not None and f.gateway_us is not None
        lines.append(
            f"At {c} connections: A's gateway CPU per request is **{a.gateway_us / f.gateway_us:.2f}×** the floor's "
            f"(goal ≤ 1.3); D's throughput is **{d.rate / b.rate:.2f}×** proxy mode's (goal ≥ 3)."
        )
    lines.append("")
    for c in conns:
        per_round = zip(samples[("A", c)], samples[("B", c)], strict=True)
        lines.append(
            f"Per-round A / B at {c} connections: " + ", ".join(f"{a.rate / b.rate:.2f}" for a, b in per_round)
        )
    if paired_lines:
        lines += [
            "",
            *paired_lines,
            "",
            "Paired: A and B driven at the same time, each by its own wrk; their gateways share core 0, so the "
            "ratio of their req/s is the inverse ratio of the gateways' CPU cost per request.",
        ]
    write_section(out, lines, HEADING)
    print("\n".join(lines))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
