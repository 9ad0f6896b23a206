"""Where one gateway worker spends its CPU under load: py-spy samples, summarised by layer and by module.

The set-up of floor_bench.py's "gateway, access log off" row: nginx (1 KB) and wrk on core 1, one gateway
worker on core 0, wrk driving HS256 Bearer requests at 32 connections. After a warm-up, py-spy samples the
worker's Python stacks (`py-spy record --format raw`, not pausing the process) for `--seconds`. Each sample
is charged to its innermost frame (self time), and that frame's file to a layer: the aiohttp client, uvicorn's
protocol, the gateway (split by module), PyJWT, asyncio/uvloop, the rest. C code (httptools, uvloop, the
kernel's socket calls) is charged to the Python frame that called it unless `--native` is given.

    .venv/bin/python bench/hotpath_profile.py                     # bench/results/profile.md
    .venv/bin/python bench/hotpath_profile.py --forwarder lean    # with server.forwarder: lean
    .venv/bin/python bench/hotpath_profile.py --access-log        # with the JSON access log (the default config)

Needs py-spy (`.venv/bin/pip install py-spy`; `scripts/bench --profile` installs it) and the right to trace
the worker (root, or kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import yaml
from floor_bench import POST_64K
from proxy_bench import HEALTH, HS_SECRET, PYTHON, ROOT, free_port, gateway_config, pinned, start, start_upstream

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
LAYERS = [  # (layer, what its file path contains), first match wins
    ("aiohttp client", "/aiohttp/"),
    ("yarl / multidict (aiohttp's URL and header types)", "/yarl/"),
    ("yarl / multidict (aiohttp's URL and header types)", "/multidict/"),
    ("uvicorn protocol", "/uvicorn/"),
    ("PyJWT", "/jwt/"),
    ("asyncio / uvloop", "/asyncio/"),
    ("asyncio / uvloop", "uvloop"),
    ("asyncio / uvloop", "/runners.py"),  # the event loop's own C code (uvloop) runs under asyncio.Runner.run
    ("httptools", "httptools"),
    ("logging / json", "/logging/"),
    ("logging / json", "/json/"),
]


def layer(path: str) -> str:
    """The layer a source file belongs to; the gateway's own files by module (gateway/forwarder.py...)."""
    path = "/" + path.lstrip("/")  # py-spy names files relative to sys.path: gateway/http.py, aiohttp/client.py
    found = re.search(r"/gateway/(.+\.py)$", path)
    if found and "/site-packages/gateway/" not in path:
        return f"gateway: {found.group(1)}"
    for name, needle in LAYERS:
        if needle in path:
            return name
    if "/site-packages/" in path:
        return "other libraries: " + path.split("/site-packages/")[1].split("/")[0]
    if path.count("/") == 1 or "/python3." in path or path.startswith("/<"):
        return "other standard library"
    return "other: " + path.split("/")[1]


def parse(raw: str) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw (collapsed) stacks: [([(function, file), ... outermost first], samples)]."""
    stacks = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or " " not in line:
            continue
        trace, count = line.rsplit(" ", 1)
        frames = []
        for part in trace.split(";"):
            found = FRAME.match(part.strip())
            if found:
                frames.append((found.group("function"), found.group("file")))
        if frames and count.isdigit():
            stacks.append((frames, int(count)))
    return stacks


def summarise(stacks: list[tuple[list[tuple[str, str]], int]], top: int = 20) -> list[str]:
    total = sum(count for _, count in stacks) or 1
    by_layer: Counter[str] = Counter()
    by_frame: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        function, path = frames[-1]
        by_layer[layer(path)] += count
        by_frame[f"`{function}` ({shorten(path)})"] += count
        for name in {layer(p) for _, p in frames}:
            inclusive[name] += count
    gateway_self = sum(n for name, n in by_layer.items() if name.startswith("gateway: "))
    lines = [
        f"{total:,} samples. Self time: each sample charged to its innermost Python frame; inclusive: the share "
        "of samples with that layer anywhere on the stack.",
        "",
        "| layer | self | inclusive |",
        "|---|---|---|",
        f"| **the gateway's own code, all modules** | **{gateway_self / total:.1%}** | "
        f"{gateway_share(stacks) / total:.1%} |",
    ]
    for name, count in by_layer.most_common():
        lines.append(f"| {name} | {count / total:.1%} | {inclusive[name] / total:.1%} |")
    lines += ["", f"Top {top} frames by self time:", "", "| frame | self |", "|---|---|"]
    for name, count in by_frame.most_common(top):
        lines.append(f"| {name} | {count / total:.1%} |")
    return lines


def gateway_share(stacks: list[tuple[list[tuple[str, str]], int]]) -> int:
    return sum(count for frames, count in stacks if any(layer(p).startswith("gateway: ") for _, p in frames))


def shorten(path: str) -> str:
    for marker in ("/site-packages/", "/wt-bench/", "/lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." and "/" in tail else tail
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15, help="seconds of sampling (default 15)")
    parser.add_argument("--rate", type=int, default=250, help="samples per second (default 250)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--access-log", action="store_true", help="server.access_log on (the default config)")
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames (uvloop, httptools) too")
    parser.add_argument("--forwarder", choices=["lean", "aiohttp"], help="server.forwarder for the gateway")
    parser.add_argument("--path", default="/app", help="what wrk asks for (/1m: the 1 MB download)")
    parser.add_argument("--post", action="store_true", help="POST 64 KB bodies (floor_bench's POST case)")
    parser.add_argument(
        "--forward-auth", action="store_true", help="the auth check nginx's auth_request makes (/.gateway/auth)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile.md"))
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    token = jwt.encode({"sub": "bench-user", "aud": "bench", "exp": int(time.time()) + 3600}, HS_SECRET)
    upstream, _ = start_upstream(workdir)
    gateway = None
    try:
        config: dict[str, Any] = gateway_config(upstream.url, "HS256", None)
        config["server"] = {"access_log": args.access_log, **({"forwarder": args.forwarder} if args.forwarder else {})}
        if args.forward_auth:
            config["server"]["trusted_proxies"] = ["127.0.0.1"]
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        serve = [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--log-level", "warning"]
        command = pinned(0, [*serve, "--config", str(workdir / "gateway.yaml"), "--port", str(port)])
        gateway = start("gateway", command, f"http://127.0.0.1:{port}", HEALTH, workdir)
        url = f"{gateway.url}{'/.gateway/auth' if args.forward_auth else args.path}"
        load = ["wrk", "-t1", f"-c{args.connections}", "-H", f"Authorization: Bearer {token}", "--latency"]
        if args.forward_auth:  # as nginx asks it: the original request in X-Original-* headers
            load += ["-H", f"X-Original-URI: {args.path}", "-H", "X-Original-Method: GET"]
        if args.post:
            (workdir / "post.lua").write_text(POST_64K)
            load += ["-s", str(workdir / "post.lua")]
        subprocess.run(pinned(1, [*load, "-d3s", url]), capture_output=True, check=True)  # warm-up
        driver = subprocess.Popen(pinned(1, [*load, f"-d{args.seconds + 4}s", url]), stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        raw = workdir / "profile.txt"
        record = [spy, "record", "--format", "raw", "-o", str(raw), "-d", str(args.seconds), "-r", str(args.rate)]
        record += ["--nonblocking", "-p", str(gateway.process.pid)] + (["--native"] if args.native else [])
        subprocess.run(pinned(1, record), check=True, capture_output=True)  # not on the gateway's core
        rate = re.search(r"Requests/sec:\s+([\d.]+)", driver.communicate()[0])
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
    stacks = raw.read_text()
    shutil.rmtree(workdir, ignore_errors=True)
    options = " ".join(sys.argv[1:])
    lines = [
        f"# Profile of the gateway's hot path, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"`.venv/bin/python bench/hotpath_profile.py{' ' + options if options else ''}`: one gateway worker on "
        f"core 0 (access log {'on' if args.access_log else 'off'}"
        f"{', server.forwarder ' + args.forwarder if args.forwarder else ''}), nginx and wrk ("
        f"{'POST 64 KB' if args.post else 'GET'} {args.path}{' as a forward-auth check' if args.forward_auth else ''}, "
        "HS256 Bearer, "
        f"{args.connections} connections; {float(rate.group(1)) if rate else 0:,.0f} req/s under the profiler) "
        f"on core 1; py-spy {args.rate} Hz for {args.seconds} s, non-blocking"
        f"{', native frames' if args.native else ''}; load average {os.getloadavg()[0]:.2f}.",
        "",
        *summarise(parse(stacks)),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    raw_out = ROOT / "bench" / "out" / "profile.raw.txt"  # 300 KB of stacks: kept out of the repository
    raw_out.parent.mkdir(parents=True, exist_ok=True)
    raw_out.write_text(stacks)
    print("\n".join(lines))
    print(f"\nwritten to {out} (raw stacks: {raw_out})")


if __name__ == "__main__":
    main()
