"""The ASGI application: shared resources, lifecycle, and config reloads.

``create_app(config)`` is the one place that assembles the gateway. What lives as long as the
process (store, HTTP clients, denylist, metrics) is opened and closed here, in the lifespan;
everything built from gateway.yaml is a ``Generation`` (see ``gateway.generation``, and
docs/architecture.md for the request path module by module).

Reload: on SIGHUP, and when the config file changes on disk, every worker re-reads and
validates the file and swaps in a new generation atomically: requests in flight finish under the
generation they started with, new ones get the new one. An invalid file is refused with the same
messages as ``gateway check``, logged, counted, and the old config keeps serving. Settings a
running process cannot change (``store.*``, ``server.host``/``port``, ``server.limits``,
``server.forwarder``) need a restart; a file that changes them is refused and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.accesslog import RequestIds
from gateway.config import GatewayConfig, load_config, reload_problems, validate_files
from gateway.cookies import DEFAULT_REFRESH_LIFETIME
from gateway.denylist import Denylist
from gateway.errors import ConfigError, StoreError
from gateway.families import Families
from gateway.forwarder import AiohttpForwarder, Forwarder
from gateway.generation import Generation
from gateway.logs import configure as configure_logging
from gateway.metrics import Metrics
from gateway.sealing import Sealer
from gateway.shared import Shared
from gateway.store import Store, open_store
from gateway.tls import control_client
from gateway.tunnel import Sockets
from gateway.types import Receive, Scope, Send
from gateway.upstream_h1 import LeanForwarder

RETIRED_CLIENTS_LINGER = 60.0  # seconds a retired generation keeps its own control-plane clients open

log = logging.getLogger("gateway")

WATCH_INTERVAL = 1.0


class Gateway:
    """The ASGI application. Build it with :func:`create_app`."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Callable[[], float] = time.time,
        forwarder: Forwarder | None = None,
        store: Store | None = None,
        config_path: str | None = None,
    ) -> None:
        store = store or open_store(config.store)
        metrics = Metrics(os.environ.get("GATEWAY_METRICS_DIR"))
        denylist = Denylist(store, clock=clock, on_store_error=lambda: metrics.store_error("denylist"))
        # memory:// lives in one process, so a random sealing key is as good as any there.
        sealer = Sealer(config.store.secret or secrets.token_bytes(32))
        self.shared = Shared(
            store=store,
            http=control_client(config.refresh.timeout),  # sections with a tls key get their own (gateway.tls)
            forwarder=forwarder or (LeanForwarder() if config.server.forwarder == "lean" else AiohttpForwarder()),
            denylist=denylist,
            metrics=metrics,
            sealer=sealer,
            clock=clock,
            request_ids=RequestIds(),
            sockets=Sockets(denylist, metrics, clock),
            # An ended session is remembered as long as its longest refresh cookie may live.
            families=Families(
                store,
                sealer,
                denylist,
                clock,
                config.cookies.refresh.max_age or DEFAULT_REFRESH_LIFETIME,
            ),
        )
        self.shared.sockets.config = config.websocket
        self.serving = Generation(config, self.shared)
        self.config_path = config_path
        self.generation = 1
        self._fingerprint = _fingerprint(config_path) if config_path else None
        self._watcher: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Future[Any]] = set()
        self._lingering: set[asyncio.Future[Any]] = set()  # retired generations' own clients, closed later
        self.shared.metrics.config_loaded(self.generation, ok=True)

    @property
    def config(self) -> GatewayConfig:
        return self.serving.config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        port = self.serving.private_port  # server.metrics: None unless configured
        if port is not None and kind != "lifespan" and (scope.get("server") or (None, None))[1] == port:
            await self.serving.private(scope, receive, send)
        elif kind == "http":
            await self.serving.handle(scope, receive, send)
        elif kind == "websocket":
            await self.serving.websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # --- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.serving.start()
        try:
            await self.shared.store.start()
        except StoreError as exc:
            # Not fatal: valid access tokens work without the store; /ready reports it.
            log.warning("store not reachable at start: %s", exc)
        await self.shared.denylist.start()
        if self.shared.metrics.shared_dir:
            self._publisher = asyncio.create_task(self._publish_metrics(), name="metrics-publish")
        if self.config_path:
            if self.config.server.watch_config:
                self._watcher = asyncio.create_task(self._watch(), name="config-watch")
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # Only possible in the main thread of a process (each uvicorn worker is one).
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        # Everything built so far lives as long as the process: keep it out of the cyclic GC's
        # full collections, which otherwise walk it again and again under load.
        gc.collect()
        gc.freeze()

    async def _publish_metrics(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.shared.metrics.publish()
            except OSError as exc:
                log.warning("metrics snapshot not written: %s", exc)

    async def shutdown(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(OSError):
                self.shared.metrics.publish()  # the last numbers of this worker
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher], timeout=2)
        await self.shared.sockets.close()
        await self.shared.denylist.close()
        await self.serving.close()  # waits for refreshes in flight: they hold locks
        if self._retired:
            await asyncio.wait(self._retired, timeout=self.config.refresh.timeout + 1)
        for lingering in list(self._lingering):  # retired generations' own clients close now
            lingering.cancel()
        if self._lingering:
            await asyncio.wait(self._lingering, timeout=1)
        await self.shared.forwarder.close()
        await self.shared.store.close()
        await self.shared.http.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- reload ---------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        task = asyncio.ensure_future(self.reload("SIGHUP"))
        self._retired.add(task)  # keep a reference until it is done
        task.add_done_callback(self._retired.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.config_path is None:
                return
            current = _fingerprint(self.config_path)
            if current is not None and current != self._fingerprint:
                await self.reload("file changed")

    async def reload(self, why: str) -> bool:
        """Re-read the config file; swap in a new generation when it is valid. True when swapped."""
        if self.config_path is None:
            return False
        self._fingerprint = _fingerprint(self.config_path)
        try:
            config = load_config(self.config_path)
            problems = reload_problems(self.config, config) + validate_files(config)
            if problems:
                raise ConfigError(problems)
            fresh = Generation(config, self.shared)
            await fresh.start()
        except ConfigError as exc:
            log.error("config reload (%s) refused, still serving generation %d:", why, self.generation)
            for problem in exc.problems:
                log.error("  %s", problem)  # one line each: a value from the file is escaped like any other
            self.shared.metrics.config_loaded(self.generation, ok=False)
            return False
        old, self.serving = self.serving, fresh
        self.shared.sockets.config = config.websocket
        self.generation += 1
        self.shared.metrics.config_loaded(self.generation, ok=True)
        log.info("config reload (%s): generation %d serving, %d routes", why, self.generation, len(config.routes))
        retiring = asyncio.ensure_future(old.close(clients=False))  # its refreshes in flight finish on their own
        self._retired.add(retiring)
        retiring.add_done_callback(self._retired.discard)
        lingering = asyncio.ensure_future(old.close_clients(after=RETIRED_CLIENTS_LINGER))
        self._lingering.add(lingering)  # its requests in flight keep their control-plane clients a while
        lingering.add_done_callback(self._lingering.discard)
        return True


def _fingerprint(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None  # a file being replaced (editors rename): look again next time


def create_app(config: GatewayConfig, **kwargs: Any) -> Gateway:
    """Build the gateway for a validated config (see Gateway for test hooks)."""
    return Gateway(config, **kwargs)


def app_from_env() -> Gateway:
    """uvicorn factory for worker processes: the config path comes from $GATEWAY_CONFIG."""
    configure_logging()
    path = os.environ.get("GATEWAY_CONFIG", "gateway.yaml")
    return create_app(load_config(path), config_path=path)
