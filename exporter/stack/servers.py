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

from ..ops.promapi import PrometheusClient, http_get

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


class ManagedProcess:
    """A child process in its own session, its output in ``log_path``; ``stop()`` ends it and its children."""

    def __init__(self, args: Sequence[str], log_path: Path, **popen: Any) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(list(args), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     **popen)

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a node failure ends a process: no clean-up, no goodbye."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Server(ManagedProcess):
    """One server process on loopback; ``name`` picks the binary, ``args`` its flags."""

    def __init__(self, name: str, args: Sequence[str], port: int, workdir: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        super().__init__([binary(name), *args], workdir / f"{name}.log", cwd=workdir)

    def wait_ready(self, timeout: float = 30.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                http_get(self.url + "/-/ready", timeout=1.0)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready on {self.url} after {timeout}s: {self.log_tail()}")


class Prometheus(Server, PrometheusClient):
    """A Prometheus server with its own TSDB folder, and a client of its query API."""

    def __init__(self, config: Path, workdir: Path, port: Optional[int] = None) -> None:
        port = port or free_port()
        Server.__init__(self, "prometheus", [
            f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ], port, workdir)


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


REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


class WebhookReceiver:
    """An Alertmanager webhook receiver on loopback that keeps every alert it is sent, with its arrival time."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                now = time.time()
                with outer._lock:
                    for alert in body.get("alerts", []):
                        outer.received.append({"received": now, "receiver": self.path.strip("/"),
                                               "status": alert.get("status"), "labels": alert.get("labels", {}),
                                               "annotations": alert.get("annotations", {})})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self, **labels: str) -> List[Dict[str, Any]]:
        """Firing alerts received so far whose labels include ``labels``."""
        with self._lock:
            return [a for a in self.received if a["status"] == "firing"
                    and all(a["labels"].get(k) == v for k, v in labels.items())]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def prometheus_config(workdir: Path, targets: Sequence[str], rule_dir: Path, alertmanager: str, port: int,
                      interval: str = "1s", extra_targets: Optional[Dict[str, List[str]]] = None) -> Path:
    """deploy/prometheus/prometheus.yml for a local stack: loopback targets, ``interval`` scrapes and
    evaluations, the rules in ``rule_dir``; other jobs get the targets in ``extra_targets`` or are left out."""
    import yaml

    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(rule_dir / "*.rules.yml")]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager]
    (workdir / "targets").mkdir(parents=True, exist_ok=True)
    (workdir / "targets" / "training.json").write_text(json.dumps([{"targets": list(targets)}]))
    extra = dict(extra_targets or {}, prometheus=[f"127.0.0.1:{port}"])
    jobs = []
    for job in config["scrape_configs"]:
        job["scrape_interval"] = interval
        if job["job_name"] == "training":
            job["file_sd_configs"] = [{"files": [str(workdir / "targets" / "*.json")], "refresh_interval": "1s"}]
        elif job["job_name"] in extra:
            job["static_configs"] = [{"targets": extra[job["job_name"]]}]
        else:
            continue
        jobs.append(job)
    config["scrape_configs"] = jobs
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def alertmanager_config(workdir: Path, webhook_url: str) -> Path:
    """deploy/alertmanager/alertmanager.yml for a local stack: the same routes, grouping and inhibition, every
    notifying receiver sending to ``webhook_url``/<receiver>, and second-scale grouping delays."""
    import yaml

    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    config["templates"] = [str(DEPLOY / "alertmanager" / t) for t in config.get("templates", [])]
    config["route"].update(group_wait="1s", group_interval="2s", repeat_interval="1h")
    for receiver in config["receivers"]:
        if len(receiver) > 1:  # it notifies someone: send it here instead
            name = receiver["name"]
            receiver.clear()
            receiver.update(name=name, webhook_configs=[{"url": f"{webhook_url}/{name}", "send_resolved": True}])
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class DemoRun(ManagedProcess):
    """``python -m exporter demo`` as a separate process (one training job), its output in a log file."""

    def __init__(self, scenario: str, run: str, port: int, workdir: Path, *, steps: int = 100_000,
                 step_time: float = 0.05, max_window: float = 2.0, eval_every: int = 50, linger: float = 0.0,
                 python: Optional[str] = None) -> None:
        import sys

        self.scenario, self.run, self.port = scenario, run, port
        self.target = f"127.0.0.1:{port}"
        self.started = time.time()
        super().__init__(
            [python or sys.executable, "-m", "exporter", "demo", "--scenario", scenario, "--run", run,
             "--port", str(port), "--addr", "127.0.0.1", "--steps", str(steps), "--step-time", str(step_time),
             "--max-window", str(max_window), "--eval-every", str(eval_every), "--linger", str(linger)],
            workdir / f"{run}.log", cwd=REPO,
            # One thread each: many small runs share few cores.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})

    def fault_time(self) -> Optional[float]:
        """Unix time the run injected its fault, once it has."""
        import re

        m = re.search(rb"injected at unix time ([0-9.]+)", self.log_path.read_bytes())
        return float(m.group(1)) if m else None


class LocalStack:
    """Prometheus and Alertmanager on loopback with the repository's configuration, rules generated from
    ``thresholds``, and a webhook receiver standing in for the notification channels."""

    def __init__(self, workdir: Path, thresholds: Path, targets: Sequence[str], interval: str = "1s",
                 extra_targets: Optional[Dict[str, List[str]]] = None) -> None:
        from ..ops.rules import write

        self.workdir = Path(workdir)
        rule_dir = self.workdir / "rules"
        write(thresholds, rule_dir)
        self.webhook = WebhookReceiver()
        self.alertmanager = Alertmanager(alertmanager_config(self.workdir / "alertmanager", self.webhook.url),
                                         self.workdir / "alertmanager")
        prom_port = free_port()
        config = prometheus_config(self.workdir / "prometheus", targets, rule_dir,
                                   f"127.0.0.1:{self.alertmanager.port}", prom_port, interval, extra_targets)
        self.prometheus = Prometheus(config, self.workdir / "prometheus", port=prom_port)

    def __enter__(self) -> "LocalStack":
        try:
            self.alertmanager.wait_ready()
            self.prometheus.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.prometheus.stop()
        self.alertmanager.stop()
        self.webhook.stop()
