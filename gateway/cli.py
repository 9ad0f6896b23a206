"""Command line: ``gateway serve``, ``gateway check``, ``gateway demo``, ``gateway sessions list|end``.

Bad configuration ends the process with exit code 1 and a message naming each bad key; it is
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.config import GatewayConfig, load_config, validate_files, workers_problems
from gateway.errors import ConfigError
from gateway.logs import configure as configure_logging


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get("GATEWAY_CONFIG") or "gateway.yaml"


def _load(path: str, workers: int = 1) -> GatewayConfig | None:
    """The validated config, or None after printing every problem (the file, the files it names, the workers)."""
    try:
        config = load_config(path)
        problems = validate_files(config) + workers_problems(config, workers)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"gateway: invalid config {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
    return config


def _check(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    config = _load(path)
    if config is None:
        return 1
    from gateway.routing import RouteTable

    print(f"{path}: ok")
    tokens = config.tokens
    checked = f"algorithms: {', '.join(tokens.algorithms)}"
    if tokens.opaque is not None:
        checked = f"{'introspection' if tokens.introspection else 'userinfo'}: {tokens.opaque.endpoint}"
    print(f"store: {config.store.url.split('@')[-1]}  {checked}")
    print("routes (in match order):")
    for line in RouteTable.from_config(config.routes).describe():
        print(f"  {line}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    config = _load(path, args.workers)
    if config is None:
        return 1
    import uvicorn

    from gateway.limits import server_options, websocket_options

    os.environ["GATEWAY_CONFIG"] = os.path.abspath(path)
    os.environ["GATEWAY_LOG_LEVEL"] = args.log_level  # for the worker processes
    server_config = uvicorn.Config(
        "gateway.app:app_from_env",
        factory=True,
        host=args.host or config.server.host,
        port=args.port or config.server.port,
        workers=args.workers,
        # X-Forwarded-* are the gateway's business (server.trusted_proxies); uvicorn's own
        # handling would trust 127.0.0.1 behind our back.
        proxy_headers=False,
        server_header=False,
        date_header=False,  # upstreams send their own; ours is added in responses.send_response
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
        # httptools, extended with server.limits (gateway/limits.py), and the keep-alive idle timeout.
        **server_options(config.server.limits),
        # Client-side WebSocket limits (the upstream side is set per socket from the same keys).
        **websocket_options(config.websocket),
    )
    private = _private_sockets(config, server_config.port)
    if private is None:
        return 1
    if args.workers > 1:
        import tempfile

        from gateway.supervisor import Supervisor

        # Workers publish metric snapshots here so that any of them answers a scrape for all.
        with tempfile.TemporaryDirectory(prefix="gateway-metrics-") as metrics_dir:
            os.environ["GATEWAY_METRICS_DIR"] = metrics_dir
            Supervisor(server_config, sockets=[server_config.bind_socket(), *private]).run()
        return 0
    server = uvicorn.Server(server_config)
    server.run(sockets=[server_config.bind_socket(), *private] if private else None)
    return 0 if server.started else 1


def _private_sockets(config: GatewayConfig, public_port: int) -> list[socket.socket] | None:
    """The private metrics listener's socket (server.metrics), bound here so that every worker answers on it, as on
    the public one; [] without one; None after saying why it cannot be had."""
    listener = config.server.metrics
    if listener is None:
        return []
    if listener.port == public_port:
        print(f"gateway: server.metrics.port: {public_port} is the public port (--port)", file=sys.stderr)
        return None
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listener.host, listener.port))
    except OSError as exc:
        sock.close()
        where = f"{listener.host}:{listener.port}"
        print(f"gateway: server.metrics: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return None
    sock.set_inheritable(True)
    return [sock]


def _sessions(args: argparse.Namespace) -> int:
    """``gateway sessions list|end --sub S [--sid X]``: the sessions of a user (never a token), or ended everywhere."""
    if not args.sub and not args.sid:
        print("gateway sessions: give --sub, --sid or both", file=sys.stderr)
        return 2
    path = _config_path(args.config)
    config = _load(path)
    if config is None:
        return 1
    if not config.store.secret:
        print(f"gateway sessions: {path}: store.secret is not set (the index is keyed by it)", file=sys.stderr)
        return 1
    import asyncio

    from gateway.errors import StoreError

    try:
        return asyncio.run(_sessions_in_store(config, args.action, args.sub, args.sid))
    except StoreError as exc:
        print(f"gateway sessions: store {config.store.url.split('@')[-1]} unreachable: {exc}", file=sys.stderr)
        return 1


async def _sessions_in_store(config: GatewayConfig, action: str, sub: str | None, sid: str | None) -> int:
    import time

    from gateway.cookies import DEFAULT_REFRESH_LIFETIME
    from gateway.denylist import Denylist
    from gateway.families import Families, FamilyIndex
    from gateway.sealing import Sealer
    from gateway.store import open_store

    store = open_store(config.store)
    try:
        await store.ping()
        lifetime = config.cookies.refresh.max_age or DEFAULT_REFRESH_LIFETIME
        sealer = Sealer(config.store.secret or "")
        families = Families(store, sealer, Denylist(store), time.time, lifetime)
        index = FamilyIndex(families)
        found = await (index.end(sub=sub, sid=sid) if action == "end" else index.sessions(sub=sub, sid=sid))
    finally:
        await store.close()
    print("id\tsub\tsid\tcreated\tlast_refresh\tstate")  # tab-separated, for people and for cut/awk
    for s in found:
        state = "ended now" if action == "end" else (f"ended ({s.ended})" if s.ended else "active")
        print(f"{s.id}\t{s.sub}\t{s.sid or '-'}\t{_when(s.created)}\t{_when(s.refreshed)}\t{state}")
    print(f"{len(found)} session(s) {'ended' if action == 'end' else 'found'}")
    return 0


def _when(epoch: float | None) -> str:
    import datetime

    if not epoch:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.runner import run_demo

    return run_demo(port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="JWT-authenticating reverse proxy for legacy apps")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway under uvicorn")
    serve.add_argument("--config", help="path to gateway.yaml (default: $GATEWAY_CONFIG, else ./gateway.yaml)")
    serve.add_argument("--host", help="bind address (default: server.host)")
    serve.add_argument("--port", type=int, help="port (default: server.port)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)

    check = commands.add_parser("check", help="validate the config and print the route table")
    check.add_argument("--config", help="path to gateway.yaml (default: $GATEWAY_CONFIG, else ./gateway.yaml)")
    check.set_defaults(func=_check)

    sessions = commands.add_parser("sessions", help="list or end a user's sessions (in the config's store)")
    sessions.add_argument("action", choices=["list", "end"])
    sessions.add_argument("--sub", help="the user (the tokens' sub claim)")
    sessions.add_argument("--sid", help="the IdP's login session (the sid claim)")
    sessions.add_argument("--config", help="path to gateway.yaml (default: $GATEWAY_CONFIG, else ./gateway.yaml)")
    sessions.set_defaults(func=_sessions)

    demo = commands.add_parser("demo", help="run a demo IdP, an echo upstream and the gateway together")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default: 8080)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", None))
    try:
        result: int = args.func(args)
    except BrokenPipeError:  # `gateway check | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
