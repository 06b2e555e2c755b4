"""Local Prometheus, Alertmanager and Pushgateway processes on loopback, for the demo and the tests.

Each server runs from the OS package's binary with a data folder of its own and is stopped by ``stop()``
(or leaving the ``with`` block); nothing is written outside the folder given.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus", "prometheus-alertmanager": "prometheus-alertmanager",
            "amtool": "prometheus-alertmanager", "prometheus-pushgateway": "prometheus-pushgateway"}


def binary(name: str) -> str:
    """Path of a server binary, or a clear error naming the OS package that provides it."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found: install the OS package (apt-get install {PACKAGES.get(name, name)})")
    return path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


class Server:
    """One server process on loopback; ``name`` picks the binary, ``args`` its flags."""

    ready_path = "/-/ready"

    def __init__(self, name: str, args: Sequence[str], port: int, workdir: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([binary(name), *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=workdir, start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                http_get(self.url + self.ready_path, timeout=1.0)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready on {self.url} after {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Prometheus(Server):
    """A Prometheus server with its own TSDB folder, and helpers for its HTTP query API."""

    def __init__(self, config: Path, workdir: Path, port: Optional[int] = None) -> None:
        port = port or free_port()
        super().__init__("prometheus", [
            f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ], port, workdir)

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise RuntimeError(f"Prometheus API error for {params}: {body.get('error', exc)}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API error for {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time_: Optional[float] = None) -> List[Dict[str, Any]]:
        """Instant vector result of ``expr`` as a list of {"metric": labels, "value": float}."""
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": float(data["result"][1])}]
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> List[Dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        return [{"metric": r["metric"], "values": [(float(t), float(v)) for t, v in r["values"]]}
                for r in data["result"]]

    def wait_for(self, expr: str, timeout: float = 30.0, interval: float = 0.5) -> List[Dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for {expr!r} after {timeout}s")
            time.sleep(interval)


class Alertmanager(Server):
    """An Alertmanager on loopback that does not gossip (no cluster listener)."""

    def __init__(self, config: Path, workdir: Path, port: Optional[int] = None) -> None:
        port = port or free_port()
        super().__init__("prometheus-alertmanager", [
            f"--config.file={config}", f"--storage.path={workdir / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
        ], port, workdir)


class Pushgateway(Server):
    """A Pushgateway on loopback."""

    def __init__(self, workdir: Path, port: Optional[int] = None) -> None:
        port = port or free_port()
        super().__init__("prometheus-pushgateway", [f"--web.listen-address=127.0.0.1:{port}"], port, workdir)
