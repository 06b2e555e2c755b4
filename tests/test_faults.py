"""Faults survived, with real servers: a scrape storm, stalled scrapes, a NaN storm, Alertmanager down when an
alert fires, the training process SIGKILLed, Prometheus restarted after a NaN it did not see, a full disk."""
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter import TrainingExporter, server
from exporter.metrics import METRICS
from exporter.stack.servers import DEPLOY, DemoRun, LocalStack, ManagedProcess, free_port
from exporter.stack.showcase import Showcase

FAST = DEPLOY / "prometheus" / "thresholds-demo.yaml"
REPO = Path(__file__).resolve().parents[1]


def _proc_status(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"threads": int(fields["Threads"]), "rss_mb": int(fields["VmRSS"].split()[0]) / 1024}


def _scrape(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def storm(url: str, rate: float, seconds: float, clients: int = 6) -> dict:
    """``rate`` scrapes a second for ``seconds`` from ``clients`` threads; returns the counts."""
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(i: int) -> None:
        next_at = time.monotonic() + i / rate
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += clients / rate
            try:
                _scrape(url, timeout=5)
                key = "ok"
            except OSError:
                key = "failed"
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


TRAINER = """
import sys, time
from exporter import TrainingExporter
exp = TrainingExporter(run="storm", port=int(sys.argv[1]), addr="127.0.0.1", config={"lr": 0.1})
while True:
    exp.log_step(loss=1.0, samples=8)
    time.sleep(0.01)
"""


def test_scrape_storm_bounded_threads_and_memory(tmp_path, capsys):
    """300 scrapes a second at a real training process: its threads stay fixed, its memory grows < 20 MB, and it
    keeps training. (benchmarks/scrape_storm.py runs the full 60 s and prints the step time.)"""
    # A training process that only logs steps: what the storm costs is the exporter's, not a model's.
    port = free_port()
    run = ManagedProcess([sys.executable, "-c", TRAINER, str(port)], tmp_path / "trainer.log", cwd=REPO)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                _scrape(url)
                break
            except OSError:
                assert run.proc.poll() is None, run.log_tail()
                time.sleep(0.3)
        storm(url, 300, 2)  # warm-up: every worker thread and buffer exists
        # A trainer's own memory grows for its first seconds (allocator, lazy initialisation): measure after.
        before = _proc_status(run.proc.pid)
        for _ in range(30):
            time.sleep(2)
            now = _proc_status(run.proc.pid)
            if abs(now["rss_mb"] - before["rss_mb"]) < 1:
                break
            before = now
        step_before = _step(url)
        counts = storm(url, 300, 10)
        after = _proc_status(run.proc.pid)
        steps = _step(url) - step_before
        with capsys.disabled():
            print(f"\nscrape storm, 10 s: {counts['ok']} served, {counts['failed']} refused or failed "
                  f"({counts['ok'] / 10:.0f}/s); threads {before['threads']} -> {after['threads']}; "
                  f"RSS {before['rss_mb']:.1f} -> {after['rss_mb']:.1f} MB; {steps:.0f} training steps meanwhile")
        assert after["threads"] <= before["threads"]
        assert after["rss_mb"] - before["rss_mb"] < 20
        assert counts["ok"] > 1000 and steps > 0
    finally:
        run.stop()


def _step(url: str) -> float:
    for line in _scrape(url).decode().splitlines():
        if line.startswith("training_step{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no training_step")


def test_stalled_scrapes_cost_a_worker_each_until_their_timeout(make_exporter, monkeypatch):
    """Clients that send half a request and stall (or stop reading) hold one worker each, never the training
    thread; a normal scrape is still answered while a worker is free; the stalled ones are dropped at the
    timeout."""
    monkeypatch.setattr(server, "TIMEOUT", 2.0)
    monkeypatch.setattr(server._Handler, "timeout", 2.0)
    exp = make_exporter()
    stalled = []
    for _ in range(server.WORKERS - 1):
        sock = socket.create_connection(("127.0.0.1", exp.port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: the request never ends
        stalled.append(sock)
    started = time.monotonic()
    assert b"training_step" in _scrape(f"http://127.0.0.1:{exp.port}/metrics")
    assert time.monotonic() - started < 1.5
    step_started = time.perf_counter()
    for _ in range(100):
        exp.log_step(loss=1.0)
    assert time.perf_counter() - step_started < 1.0  # the training thread never waits on a scrape
    for sock in stalled:
        sock.settimeout(10)
        assert sock.recv(100) == b""  # the server dropped it
        sock.close()
    assert b"training_step" in _scrape(f"http://127.0.0.1:{exp.port}/metrics")


def test_connections_beyond_the_queue_are_shed_not_threaded(make_exporter, monkeypatch):
    monkeypatch.setattr(server, "TIMEOUT", 2.0)
    monkeypatch.setattr(server._Handler, "timeout", 2.0)
    exp = make_exporter()
    threads = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", exp.port)) for _ in range(server.WORKERS + server.QUEUED + 10)]
    time.sleep(0.5)
    assert threading.active_count() == threads
    for sock in socks:
        sock.close()
    time.sleep(2.5)
    assert b"training_step" in _scrape(f"http://127.0.0.1:{exp.port}/metrics")


def test_nan_storm(make_exporter, registry):
    """20,000 NaN steps (5.5 hours at a step a second) scraped all along: counted exactly, nothing raised, the
    exposition valid, no error counted."""
    exp = make_exporter()
    url = f"http://127.0.0.1:{exp.port}/metrics"
    done = threading.Event()
    scrapes = []

    def scraper():
        while not done.is_set():
            scrapes.append(len(_scrape(url)))
            time.sleep(0.05)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        for i in range(20_000):
            exp.log_step(loss=math.nan if i % 2 else math.inf, grad_norm=math.nan, samples=1)
    finally:
        done.set()
        thread.join()
    exp.close()
    labels = {"run": "test-run", "rank": "0"}
    assert registry.get_sample_value("training_loss_nonfinite_total", labels) == 20_000
    assert registry.get_sample_value("training_step", labels) == 20_000
    assert registry.get_sample_value("training_step_loss_count", labels) == 0
    assert sum(registry.get_sample_value("training_exporter_errors_total", {**labels, "where": w})
               for w in ("hook", "reader", "collect", "log")) == 0
    check = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry), capture_output=True)
    assert check.returncode == 0, check.stderr
    assert len(scrapes) > 5


# ---------------------------------------------------------------------------------- with Prometheus and Alertmanager
class Trainer:
    """A training loop in a thread of this process, 20 steps a second, that can be told to log a NaN."""

    def __init__(self, run: str) -> None:
        self.exp = TrainingExporter(run=run, port=free_port(), addr="127.0.0.1", registry=CollectorRegistry(),
                                    close_timeout=0)
        self.target = f"127.0.0.1:{self.exp.port}"
        self.nan = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            loss = 1.0
            if self.nan.is_set():
                self.nan.clear()
                loss = math.nan
            self.exp.log_step(loss=loss, samples=8)
            time.sleep(0.05)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.exp.close(stop_server=True)


def _wait(condition, timeout: float, what: str, stack: LocalStack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"{what} not within {timeout}s\n{stack.prometheus.log_tail(1500)}")


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """One local stack with the demo-speed rules watching two in-process trainers and a demo training process."""
    tmp = tmp_path_factory.mktemp("faults")
    trainers = {name: Trainer(f"fault-{name}") for name in ("am", "prom")}
    killed = DemoRun("healthy", "fault-killed", free_port(), tmp / "runs", steps=10**6)
    targets = [t.target for t in trainers.values()] + [killed.target]
    try:
        with LocalStack(tmp / "stack", FAST, targets) as stack:
            _wait(lambda: len([r for r in stack.prometheus.query('up{job="training"} == 1')]) == 3, 120,
                  "every target up", stack)
            yield stack, trainers, killed
    finally:
        killed.stop()
        for trainer in trainers.values():
            trainer.stop()


@pytest.mark.e2e
def test_alertmanager_down_when_the_alert_fires_then_up(faults):
    stack, trainers, _ = faults
    stack.alertmanager.stop()
    trainers["am"].nan.set()
    _wait(lambda: stack.prometheus.query('ALERTS{alertname="TrainingLossNotFinite", run="fault-am", '
                                         'alertstate="firing"}'), 60, "the alert firing in Prometheus", stack)
    time.sleep(3)  # Prometheus tries to send, and fails
    assert stack.webhook.alerts(run="fault-am") == []
    fired_down = time.time()
    stack.start_again("alertmanager")
    alerts = _wait(lambda: stack.webhook.alerts(alertname="TrainingLossNotFinite", run="fault-am"), 60,
                   "delivery after Alertmanager came back", stack)
    print(f"\nAlertmanager back: the alert arrived {alerts[0]['received'] - fired_down:.1f} s after it was started")


@pytest.mark.e2e
def test_training_process_sigkilled(faults):
    stack, _, killed = faults
    step = _wait(lambda: stack.prometheus.query('training_step{run="fault-killed"}'), 30, "a step", stack)
    killed.kill()
    alerts = _wait(lambda: stack.webhook.alerts(alertname="TrainingTargetDown", run="fault-killed"), 90,
                   "TrainingTargetDown for the killed run", stack)
    assert alerts[0]["labels"]["severity"]
    assert step[0]["value"] > 0


@pytest.mark.e2e
@pytest.mark.xfail("training_last_nonfinite_timestamp_seconds" not in METRICS, strict=True,
                   reason="needs the gauge training_last_nonfinite_timestamp_seconds and the rule reading it, from "
                          "the step-model and loss-rules changes; runs for real once they are merged")
def test_nan_while_prometheus_was_down_still_alerts(faults):
    """A NaN step while Prometheus is down for longer than the alert's window: the counter's increase falls
    outside every window Prometheus can see; the timestamp of the last non-finite step still tells."""
    stack, trainers, _ = faults
    stack.prometheus.stop()
    trainers["prom"].nan.set()
    time.sleep(17)  # longer than the demo thresholds' 15 s window
    stack.start_again("prometheus")
    _wait(lambda: stack.webhook.alerts(alertname="TrainingLossNotFinite", run="fault-prom"), 30,
          "TrainingLossNotFinite for the NaN Prometheus did not see", stack)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_full_disk_stops_the_showcase_cleanly(tmp_path):
    """The demo's data folder on a small tmpfs that fills up: the showcase says so and stops every process."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], check=True)
    show = Showcase(workdir=mount / "demo", scenarios=("healthy",), min_free=32 << 20)
    try:
        show.start()
        pids = [r.proc.pid for r in show.runs] + [show.pushgateway.proc.pid, show.stack.prometheus.proc.pid,
                                                  show.stack.alertmanager.proc.pid]
        show.check()
        with open(mount / "filler", "wb") as f:  # someone else's files fill the disk
            f.write(b"\0" * (80 << 20))
        with pytest.raises(OSError, match="MiB free"):
            show.watch(60)
    finally:
        show.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
               for pid in pids)
