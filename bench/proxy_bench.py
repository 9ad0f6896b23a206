"""Proxy benchmark: the gateway against the upstream itself and two baseline proxies, in one run.

Everything runs on this machine, loopback only. The proxy under test gets core 0 (taskset), the
load generator (wrk) and the upstream (nginx returning 1 KB; a raw-ASGI uvicorn upstream when
nginx is missing) share core 1. Each target is warmed up, then driven with wrk at each
connection count. Reported: req/s, p50, p99, CPU microseconds per request (the proxy's own
utime + stime from /proc), RSS, and ratios against the baselines measured in the same run.

    .venv/bin/python bench/proxy_bench.py              # full run, writes bench/RESULTS.md
    .venv/bin/python bench/proxy_bench.py --quick      # a few seconds per target, writes bench/out/
"""

from __future__ import annotations

import argparse
import os
import platform
import re
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

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.servers import free_port, wait_for_http  # noqa: E402

PYTHON = sys.executable
HEALTH = "/.gateway/health"
HS_SECRET = "bench-hs256-secret-0123456789abcdef-xyz"
BODY_1K = "x" * 1024
HEADING = "## Proxy benchmark"
TICKS = os.sysconf("SC_CLK_TCK")


def pinned(core: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *command] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else command


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def pids(self) -> list[int]:
        """The server and its worker processes (uvicorn --workers N forks them)."""
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout.split()
        return [self.process.pid, *map(int, found)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        return total

    def rss_mb(self, pid: int | None = None) -> float:
        """RSS of one process: the server itself, or with --workers N the largest worker."""
        pids = [pid] if pid else self.pids()
        sizes = []
        for each in pids:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        return max(sizes, default=0.0)


def start(name: str, command: list[str], url: str, ready: str, workdir: Path) -> Server:
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for_http(url + ready, timeout=30, process=process)
    return Server(name, process, url)


def start_upstream(workdir: Path) -> tuple[Server, str]:
    port = free_port()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx:
        # /1m: a 1 MB file for the download case of floor_bench.py (sendfile, as nginx serves files).
        (workdir / "1m.bin").write_bytes(b"x" * 1_048_576)
        conf = workdir / "nginx.conf"
        conf.write_text(
            f"""worker_processes 1; daemon off; pid {workdir}/nginx.pid; error_log {workdir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
  uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
  server {{ listen 127.0.0.1:{port}; default_type text/plain; location / {{ return 200 "{BODY_1K}"; }}
    location = /1m {{ alias {workdir}/1m.bin; sendfile on; }} }}
}}
"""
        )
        command = pinned(1, [nginx, "-c", str(conf), "-p", str(workdir)])
        return start("upstream", command, f"http://127.0.0.1:{port}", "/", workdir), "nginx 1 KB"
    script = workdir / "upstream.py"
    script.write_text(
        "import uvicorn\nBODY=b'x'*1024\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http': return\n"
        "    await send({'type':'http.response.start','status':200,'headers':[(b'content-length',b'1024')]})\n"
        "    await send({'type':'http.response.body','body':BODY})\n"
        f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False)\n"
    )
    command = pinned(1, [PYTHON, str(script)])
    return start("upstream", command, f"http://127.0.0.1:{port}", "/", workdir), "uvicorn 1 KB (nginx not found)"


def gateway_config(upstream: str, algorithm: str, key_file: Path | None) -> dict[str, object]:
    tokens: dict[str, object] = {"algorithms": [algorithm], "audience": "bench"}
    if algorithm == "HS256":
        tokens["secret"] = HS_SECRET
    else:
        tokens["public_key_file"] = str(key_file)
    return {
        # The target is auth + identity headers + metrics; the JSON access log (on by default) is
        # an I/O cost of its own, kept out so the figures compare proxies, not log pipes.
        "server": {"access_log": False},
        "tokens": tokens,
        "cookies": {"secure": False},
        "routes": [
            {"name": "public", "path": "/public/", "upstream": upstream, "auth": "none"},
            {"name": "app", "path": "/", "upstream": upstream},
        ],
    }


def wrk(
    url: str, connections: int, seconds: float, headers: dict[str, str], script: Path | None = None
) -> tuple[float, float, float, int, int]:
    """(req/s, p50 ms, p99 ms, requests, non-2xx responses) from one wrk run on core 1; ``script``: a wrk Lua
    script (a request body, another method)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:
        command += ["-s", str(script)]
    out = subprocess.run(pinned(1, [*command, url]), capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def percentile(label: str) -> float:
        value, unit = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, percentile("50"), percentile("99"), total, int(non2xx.group(1)) if non2xx else 0


@dataclass
class Row:
    target: str
    case: str
    connections: int
    rate: float
    p50: float
    p99: float
    cpu_us: float
    rss: float
    non2xx: int


def measure(server: Server, case: str, path: str, headers: dict[str, str], conns: list[int], secs: float) -> list[Row]:
    rows = []
    for connections in conns:
        cpu = server.cpu_seconds()
        rate, p50, p99, total, non2xx = wrk(server.url + path, connections, secs, headers)
        cpu_us = (server.cpu_seconds() - cpu) / max(total, 1) * 1e6
        rows.append(Row(server.name, case, connections, rate, p50, p99, cpu_us, server.rss_mb(), non2xx))
        print(
            f"  {server.name:<10} {case:<22} c={connections:<4} {rate:>9.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 32 connections; for CI smoke")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--connections", default="32,128")
    parser.add_argument("--out", help="markdown results file (default bench/RESULTS.md, or bench/out/ with --quick)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement; medians reported")
    parser.add_argument(
        "--paired-rounds", type=int, help="rounds of the paired measurement (default 5, 1 with --quick; 0: skip)"
    )
    parser.add_argument("--soak", type=float, default=0, help="also run the gateway under load this long, sampling RSS")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: install Debian's wrk (apt-get install wrk)")
    secs = 2.0 if args.quick else args.duration
    if args.paired_rounds is None:
        args.paired_rounds = 1 if args.quick else 5
    conns = [32] if args.quick else [int(c) for c in args.connections.split(",")]
    out = Path(args.out) if args.out else (ROOT / "bench" / ("out/RESULTS-quick.md" if args.quick else "RESULTS.md"))

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = workdir / "public.pem"
    key_file.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    claims = {"sub": "bench-user", "aud": "bench", "roles": ["user"], "email": "b@example.com"}
    claims["exp"] = int(time.time()) + 3600
    hs_token = jwt.encode(claims, HS_SECRET, algorithm="HS256")
    rs_token = jwt.encode(claims, key, algorithm="RS256")

    servers: list[Server] = []
    rounds = 1 if args.quick else args.rounds
    soak_lines: list[str] = []
    try:
        upstream, upstream_kind = start_upstream(workdir)
        servers.append(upstream)
        print(f"upstream: {upstream_kind} at {upstream.url}")

        def launch(name: str, command: list[str], ready: str = "/", pin: bool = True) -> Server:
            port = free_port()
            command = [*command, "--port", str(port)]
            server = start(name, pinned(0, command) if pin else command, f"http://127.0.0.1:{port}", ready, workdir)
            servers.append(server)
            return server

        # Every proxy runs from the start (all on core 0; the idle ones cost nothing), so that the
        # rounds below can interleave them: each round measures every target once, and the
        # medians over rounds are reported. Drift on the machine then hits every target alike.
        gateway_cmd = [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--log-level", "warning"]
        configs = {}
        for algorithm in ("HS256", "RS256"):
            configs[algorithm] = workdir / f"gateway-{algorithm}.yaml"
            configs[algorithm].write_text(yaml.safe_dump(gateway_config(upstream.url, algorithm, key_file)))
        baseline = [("no auth", "/app", {})]
        forwarder = launch("forwarder", [PYTHON, "bench/baselines/aiohttp_forwarder.py", "--upstream", upstream.url])
        gateway = launch("gateway", [*gateway_cmd, "--config", str(configs["HS256"])], HEALTH)
        plan: list[tuple[Server, list[tuple[str, str, dict[str, str]]]]] = [
            (upstream, [("direct", "/app", {})]),
            (launch("naive", [PYTHON, "bench/baselines/naive_httpx.py", "--upstream", upstream.url]), baseline),
            (forwarder, baseline),
            (
                gateway,
                [
                    ("HS256 bearer", "/app", {"Authorization": f"Bearer {hs_token}"}),
                    ("auth none", "/public/x", {}),
                    ("401 no token", "/app", {}),
                ],
            ),
            (
                launch("gateway-rs", [*gateway_cmd, "--config", str(configs["RS256"])], HEALTH),
                [("RS256 cookie", "/app", {"Cookie": f"gw_access={rs_token}"})],
            ),
        ]
        if not args.quick:
            # Two workers, not pinned: on 2 cores they share the machine with wrk and the upstream.
            two = launch(
                "gateway×2", [*gateway_cmd, "--config", str(configs["HS256"]), "--workers", "2"], HEALTH, False
            )
            plan.append((two, [("HS256 bearer", "/app", {"Authorization": f"Bearer {hs_token}"})]))
        for server, cases in plan:  # warm-up: pools, caches, lazy imports
            for _, path, headers in cases:
                wrk(server.url + path, conns[0], min(2.0, secs), headers)
        samples: dict[tuple[str, str, int], list[Row]] = {}
        for number in range(rounds):
            print(f"round {number + 1} of {rounds}")
            for server, cases in plan:
                for case, path, headers in cases:
                    for row in measure(server, case, path, headers, conns, secs):
                        samples.setdefault((row.target, row.case, row.connections), []).append(row)
        rows = [median(group) for group in samples.values()]
        spread = [
            f"Per-round gateway (HS256 bearer) / forwarder at {c} connections: "
            + ", ".join(
                f"{g.rate / f.rate:.2f}"
                for g, f in zip(
                    samples[("gateway", "HS256 bearer", c)], samples[("forwarder", "no auth", c)], strict=True
                )
            )
            for c in conns
        ]
        if args.paired_rounds:
            spread += ["", *paired(forwarder, gateway, hs_token, conns, min(secs, 5.0), args.paired_rounds)]
        if args.soak:
            hs_serve = [*gateway_cmd, "--config", str(configs["HS256"])]
            soak_lines = soak(hs_serve, workdir, hs_token, args.soak)
    finally:
        for server in servers:
            server.stop()
    report(rows, out, upstream_kind, secs, rounds, spread, soak_lines)


def paired(forwarder: Server, gateway: Server, token: str, conns: list[int], secs: float, rounds: int) -> list[str]:
    """Gateway and forwarder on core 0 at once, each under its own wrk (both on core 1).

    The kernel shares core 0 evenly between two busy processes, so the ratio of their req/s is
    the inverse ratio of their CPU cost per request, and whatever else the machine does in the
    meantime (other tenants, frequency changes) hits both at the same instant. On a noisy
    machine this is the steadier way to compare them; the table above is the absolute view.
    """
    bearer = {"Authorization": f"Bearer {token}"}
    lines = []
    with ThreadPoolExecutor(2) as pool:
        for connections in conns:
            ratios = []
            for _ in range(rounds):
                base = pool.submit(wrk, forwarder.url + "/app", connections, secs, {})
                ours = pool.submit(wrk, gateway.url + "/app", connections, secs, bearer)
                ratios.append(ours.result()[0] / base.result()[0])
            print(f"  paired     gateway / forwarder    c={connections:<4} " + ", ".join(f"{r:.3f}" for r in ratios))
            lines.append(
                f"Paired gateway (HS256 bearer) / forwarder at {connections} connections: "
                f"median **{statistics.median(ratios):.2f}** over {rounds} rounds of {secs:g} s "
                f"({', '.join(f'{r:.2f}' for r in ratios)})"
            )
    lines += [
        "",
        "Paired: both proxies on core 0 at the same time, each driven by its own wrk. The kernel "
        "gives each half the core, so the ratio of their req/s is the inverse ratio of their CPU "
        "cost per request, and drift on the machine hits both at the same instant.",
    ]
    return lines


def soak(serve: list[str], workdir: Path, token: str, seconds: float) -> list[str]:
    """Run the gateway (1 worker, core 0) under steady load; sample its RSS to show it stays flat."""
    port = free_port()
    server = start("soak", pinned(0, [*serve, "--port", str(port)]), f"http://127.0.0.1:{port}", "/", workdir)
    print(f"soak: {seconds:g} s under load")
    command = ["wrk", "-t1", "-c64", f"-d{int(seconds)}s", "-H", f"Authorization: Bearer {token}", f"{server.url}/app"]
    load = subprocess.Popen(pinned(1, command), stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    try:
        while load.poll() is None:
            samples.append((time.monotonic() - started, server.rss_mb()))
            time.sleep(min(15.0, max(1.0, seconds / 20)))
        out = load.communicate()[0]
    finally:
        server.stop()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    first, last = samples[0][1], samples[-1][1]
    peak = max(mb for _, mb in samples)
    return [
        f"Soak: {seconds:g} s at 64 connections, HS256 bearer, 1 worker: "
        f"{float(rate.group(1)) if rate else 0:,.0f} req/s; "
        f"RSS {first:.0f} MB at the start -> {last:.0f} MB at the end (peak {peak:.0f} MB).",
        "",
        "RSS over time (s: MB): " + ", ".join(f"{t:.0f}: {mb:.0f}" for t, mb in samples),
    ]


def median(group: list[Row]) -> Row:
    """The middle of several rounds: medians of rates, latencies and CPU; the largest RSS."""
    first = group[0]
    return Row(
        first.target,
        first.case,
        first.connections,
        statistics.median(r.rate for r in group),
        statistics.median(r.p50 for r in group),
        statistics.median(r.p99 for r in group),
        statistics.median(r.cpu_us for r in group),
        max(r.rss for r in group),
        sum(r.non2xx for r in group),
    )


def report(
    rows: list[Row], out: Path, upstream_kind: str, secs: float, rounds: int, spread: list[str], soak_lines: list[str]
) -> None:
    def find(target: str, case: str, connections: int) -> Row | None:
        return next((r for r in rows if (r.target, r.case, r.connections) == (target, case, connections)), None)

    lines = [
        f"{HEADING}, {date.today()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}. Upstream: {upstream_kind}. Proxy pinned to core 0; wrk and the "
        f"upstream on core 1. {secs:g} s per measurement after a warm-up; one worker per proxy; {rounds} rounds, "
        "interleaved (each round measures every target once); each figure is the median over the rounds.",
        "",
        "| target | case | conns | req/s | p50 ms | p99 ms | CPU µs/req | RSS MB | non-2xx | × forwarder | × naive "
        "| × direct |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        forwarder, naive, direct = (
            find(t, c, r.connections)
            for t, c in (("forwarder", "no auth"), ("naive", "no auth"), ("upstream", "direct"))
        )
        ratio = [f"{r.rate / b.rate:.2f}" if b else "-" for b in (forwarder, naive, direct)]
        lines.append(
            f"| {r.target} | {r.case} | {r.connections} | {r.rate:,.0f} | {r.p50:.2f} | {r.p99:.2f} | "
            f"{r.cpu_us:.0f} | {r.rss:.0f} | {r.non2xx} | {' | '.join(ratio)} |"
        )
    lines += [
        "",
        "Ratios compare median req/s at the same connection count in this run; absolute numbers are noisy here.",
    ]
    lines += ["", *spread]
    if soak_lines:
        lines += ["", *soak_lines]
    # Sections other benchmarks write into the same file (## headings: forward_auth_bench.py) are kept.
    write_section(out, lines, HEADING)
    print("\n".join(lines))
    print(f"\nwritten to {out}")


def write_section(out: Path, lines: list[str], heading: str) -> None:
    """Replace a benchmark's section of ``out`` (from ``heading`` to the next ``## `` or the end), or add it."""
    text = out.read_text() if out.exists() else ""
    start = 0 if text.startswith(heading) else text.find(f"\n{heading}")
    if start < 0:
        head, tail = text.rstrip("\n"), ""
    else:
        head = text[:start].rstrip("\n")
        following = text.find("\n## ", start + 1)
        tail = text[following:] if following >= 0 else ""
    section = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text((head + "\n\n" if head else "") + section + "\n" + tail)


if __name__ == "__main__":
    main()
