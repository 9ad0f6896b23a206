"""CPU per request of the two forwarders (server.forwarder: lean | aiohttp), in process, against a local upstream.

The upstream is nginx answering 1 KB (a raw asyncio server in a child process when nginx is missing), so the
process measured holds only the forwarder and its event loop (uvloop). Each forwarder is warmed up, then sends N
requests one after another and N more from 16 concurrent tasks, each answer read whole; reported: the process's
CPU time (``time.process_time``) per request. A few seconds in all.

    .venv/bin/python bench/forwarder_cpu.py [-n 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from gateway.forwarder import AiohttpForwarder, Forwarder, upstream_url
from gateway.upstream_h1 import LeanForwarder

NGINX = """daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir};
  scgi_temp_path {dir};
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "{body}"; }} }} }}
"""
RAW = """
import asyncio, sys
BODY = b"x" * 1024
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 1024\\r\\nContent-Type: text/plain\\r\\n\\r\\n" + BODY
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while b"\\r\\n\\r\\n" in self.buf:
            _, _, self.buf = self.buf.partition(b"\\r\\n\\r\\n"); self.t.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_upstream(port: int, workdir: str) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx:
        conf = Path(workdir) / "nginx.conf"
        conf.write_text(NGINX.format(dir=workdir, port=port, body="x" * 1024))
        process = subprocess.Popen([nginx, "-c", str(conf), "-p", workdir], stderr=subprocess.DEVNULL)
    else:
        process = subprocess.Popen([sys.executable, "-c", RAW, str(port)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the upstream did not start")


async def one(forwarder: Forwarder, url: str) -> None:
    response = await forwarder.send("GET", upstream_url(url), [("host", "app.example")], None, connect_timeout=5,
                                    read_timeout=5)  # fmt: skip
    while await response.read():
        pass


async def measure(forwarder: Forwarder, url: str, n: int) -> tuple[float, float]:
    for _ in range(300):
        await one(forwarder, url)
    started = time.process_time()
    for _ in range(n):
        await one(forwarder, url)
    sequential = (time.process_time() - started) / n

    async def worker(count: int) -> None:
        for _ in range(count):
            await one(forwarder, url)

    started = time.process_time()
    await asyncio.gather(*(worker(n // 16) for _ in range(16)))
    concurrent = (time.process_time() - started) / (n // 16 * 16)
    await forwarder.close()
    return sequential, concurrent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="requests per mode (sequential, concurrent)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        upstream = start_upstream(port, workdir)
        try:
            url = f"http://127.0.0.1:{port}/"
            for name, make in (("aiohttp", AiohttpForwarder), ("lean", LeanForwarder)):
                sequential, concurrent = uvloop.run(measure(make(), url, args.n))
                print(f"{name:8} CPU per request: sequential {sequential * 1e6:6.1f} us, "
                      f"16 concurrent {concurrent * 1e6:6.1f} us")  # fmt: skip
        finally:
            upstream.terminate()
            upstream.wait()


if __name__ == "__main__":
    main()
