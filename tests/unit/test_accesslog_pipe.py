"""Worker processes sharing one stdout pipe: every access line arrives whole (gateway.accesslog ``_chunks``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

WRITER = """
import asyncio, sys
from gateway import logs
from gateway.accesslog import AccessLog, RequestIds, RequestInfo
from gateway.sealing import Sealer

logs.configure("info")
log, name = AccessLog(True, Sealer("s" * 32)), sys.argv[1]

async def main():
    for turn in range(10):
        for n in range(400):  # one busy turn: ~90 KB of lines, more than the pipe holds
            info = RequestInfo()
            info.identify(None, RequestIds())
            log.write("GET", f"/{name}/{turn}/{n}", info, "app", 200, 0.001)
        await asyncio.sleep(0)

asyncio.run(main())
"""


def test_lines_of_workers_sharing_a_stdout_pipe_are_never_torn() -> None:
    read_end, write_end = os.pipe()
    workers = [
        subprocess.Popen([sys.executable, "-c", WRITER, f"w{n}"], stdout=write_end, stderr=subprocess.DEVNULL)
        for n in range(3)
    ]
    os.close(write_end)
    time.sleep(1.0)  # the pipe fills: each worker's next write blocks part-way (the reader is slow)
    with os.fdopen(read_end, "rb") as reader:
        out = reader.read()
    assert [worker.wait(timeout=30) for worker in workers] == [0, 0, 0]
    paths = [json.loads(line)["path"] for line in out.decode().splitlines()]  # a torn line is not JSON
    assert sorted(paths) == sorted(f"/w{w}/{t}/{n}" for w in range(3) for t in range(10) for n in range(400))
