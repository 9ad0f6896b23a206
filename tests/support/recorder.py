"""An upstream that records every request it gets, byte for byte, and has no limits of its own.

The demo echo upstream (uvicorn) would answer whatever the gateway lets through, but keeps no
record; Python's http.server refuses more than 100 headers itself, so a test could not tell its
431 from the gateway's. This one reads a head of any size, notes it as soon as it has it (so a
request cut during its body is still seen), then reads the body (Content-Length or chunked) and
answers 200 ``ok``, keeping the connection alive as the gateway's client pool expects. With
``answer_first`` it answers as soon as it has the head and reads the body after, as nginx's
``return`` does; ``connections`` counts the connections it accepted.
"""

from __future__ import annotations

import socketserver
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self


@dataclass
class Seen:
    """One request as the upstream got it: its path, the size of its head, and how much of its body arrived."""

    path: str
    head_bytes: int
    body_bytes: int = 0
    complete: bool = False  # the whole body arrived


class Recorder:
    """A threaded raw HTTP/1.1 server on loopback; ``seen`` lists the requests it got, in order."""

    def __init__(self, answer_first: bool = False) -> None:
        self.seen: list[Seen] = []
        self.connections = 0
        self.answer_first = answer_first
        self._lock = threading.Lock()
        recorder = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with recorder._lock:
                    recorder.connections += 1
                while recorder._serve_one(self.rfile, self.wfile):
                    pass

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def paths(self) -> list[str]:
        with self._lock:
            return [seen.path for seen in self.seen]

    def find(self, path: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.path == path]

    def _serve_one(self, rfile: BinaryIO, wfile: BinaryIO) -> bool:
        lines = [rfile.readline()]
        while lines[-1] not in (b"\r\n", b"\n", b""):
            lines.append(rfile.readline())
        if lines[-1] == b"":
            return False  # the connection ended before the head did
        parts = lines[0].split(b" ")
        seen = Seen(path=parts[1].decode("latin-1") if len(parts) > 1 else "", head_bytes=sum(map(len, lines)))
        with self._lock:
            self.seen.append(seen)
        fields = dict(line.rstrip(b"\r\n").lower().split(b":", 1) for line in lines[1:-1] if b":" in line)
        if self.answer_first:
            self._answer(wfile)
        if b"chunked" in fields.get(b"transfer-encoding", b""):
            complete = self._chunked(rfile, seen)
        else:
            wanted = int(fields.get(b"content-length", b"0") or 0)
            seen.body_bytes = len(rfile.read(wanted)) if wanted else 0
            complete = seen.body_bytes == wanted
        if not complete:
            return False
        seen.complete = True
        if not self.answer_first:
            self._answer(wfile)
        return True

    @staticmethod
    def _answer(wfile: BinaryIO) -> None:
        wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
        wfile.flush()

    @staticmethod
    def _chunked(rfile: BinaryIO, seen: Seen) -> bool:
        while True:
            size_line = rfile.readline()
            if not size_line.endswith(b"\n"):
                return False
            size = int(size_line.split(b";")[0], 16)
            data = rfile.read(size + 2)
            if len(data) < size + 2:
                return False
            seen.body_bytes += size
            if size == 0:
                return True

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, name="recorder", daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
