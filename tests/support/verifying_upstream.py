"""An upstream that verifies the gateway's signed identity assertion the way an app would: PyJWT, keys from the
gateway's JWKS endpoint (``jwt.PyJWKClient``), its own URL as the audience.

It runs in this process (uvicorn in a thread, on a port it binds itself) because the gateway's config names the
upstream's URL and the upstream needs the gateway's: ``jwks_url`` is set once the gateway is up. Every answer is
JSON saying what it found: ``{"assertions": n, "verified": bool, "claims": {...}, "error": "..."}``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import jwt
import uvicorn


class VerifyingUpstream:
    """ASGI app and its server; ``url`` once started, ``jwks_url`` to be set by the test."""

    def __init__(self, header: bytes = b"x-gateway-assertion", algorithms: tuple[str, ...] = ("ES256",)) -> None:
        self.header, self.algorithms = header, list(algorithms)
        self.jwks_url = ""
        self._keys: jwt.PyJWKClient | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(self, lifespan="off", log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def verify(self, assertion: str) -> dict[str, Any]:
        """What the app would do with one assertion."""
        if self._keys is None:
            self._keys = jwt.PyJWKClient(self.jwks_url, cache_keys=True)
        key = self._keys.get_signing_key_from_jwt(assertion)
        claims: dict[str, Any] = jwt.decode(assertion, key, algorithms=self.algorithms, audience=self.url)
        return claims

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        found = [v.decode("latin-1") for n, v in scope["headers"] if n == self.header]
        answer: dict[str, Any] = {"assertions": len(found), "verified": False}
        if len(found) == 1:
            try:
                answer.update(verified=True, claims=self.verify(found[0]))
            except jwt.PyJWTError as exc:
                answer["error"] = f"{type(exc).__name__}: {exc}"
        body = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def __enter__(self) -> Self:
        self._sock.listen(128)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the verifying upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
