"""The process manager for ``gateway serve --workers N``: uvicorn's, with SIGHUP meaning reload.

uvicorn answers SIGHUP by replacing every worker; a gateway reloads its config in place
instead (each worker validates the file and keeps serving the old config when it is bad), so
the signal is passed on to the workers.
"""

from __future__ import annotations

import logging
import os
import signal

from uvicorn.supervisors import Multiprocess

log = logging.getLogger("gateway")


class Supervisor(Multiprocess):
    def handle_hup(self) -> None:
        log.info("SIGHUP: asking %d workers to reload the config", len(self.processes))
        for worker in self.processes:
            pid = worker.process.pid
            if pid is not None and worker.process.is_alive():
                os.kill(pid, signal.SIGHUP)
