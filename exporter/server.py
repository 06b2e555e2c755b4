"""The HTTP server that serves ``/metrics`` from a background thread of the training process."""
from __future__ import annotations

import errno

from prometheus_client import CollectorRegistry, start_http_server

from . import runtime


class MetricsServer:
    """Serves ``registry`` on ``addr:port`` (port 0 picks a free one) until ``stop()``."""

    def __init__(self, port: int, addr: str, registry: CollectorRegistry) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    exc.errno,
                    f"cannot serve metrics on {addr}:{port}: the port is already in use. Choose another with "
                    f"TrainingExporter(port=...) or the environment variable {runtime.ENV_PREFIX}PORT "
                    f"(port=0 picks a free port).",
                ) from None
            raise
        self.addr = addr
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
