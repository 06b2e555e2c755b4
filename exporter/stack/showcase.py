"""The whole system on one machine: real training runs, one per pathology, watched by a local stack.

``python -m exporter stack`` (what ``make demo`` runs) starts Prometheus, Alertmanager and Pushgateway on
loopback with the repository's configuration and the demo-speed thresholds, runs the training jobs side by
side, prints the alerts as Alertmanager receives them and a summary at the end. Everything it writes stays in
its working folder; every process it started is stopped when it ends.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .servers import DEPLOY, DemoRun, LocalStack, Pushgateway, Stopped, free_port, http_get, stop_on_signals

THRESHOLDS = DEPLOY / "prometheus" / "thresholds-demo.yaml"

# Each pathology and the alert it must raise; a healthy run must raise none.
EXPECTED = {
    "healthy": None,
    "overfit": "TrainingOverfitting",
    "spike": "TrainingLossSpike",
    "explode": "TrainingGradientExplosion",
    "diverge": "TrainingDiverging",
    "nan": "TrainingLossNotFinite",
    "plateau": "TrainingPlateau",
    "hang": "TrainingHung",
    "crash": "TrainingTargetDown",
}
# What else is true of a pathology and may fire beside its alert: a loss that climbs without bound also
# spikes and blows up its gradients.
ALSO_TRUE = {"diverge": {"TrainingLossSpike", "TrainingGradientExplosion"},
             # The bad batch's step also has gradients far above the run's usual norm: a real gradient burst.
             "spike": {"TrainingGradientExplosion"}}


@dataclass
class Arrival:
    """An alert as Alertmanager first reported it."""

    alertname: str
    run: str
    severity: str
    state: str  # "active" or "suppressed" (inhibited)
    seen: float
    description: str


@dataclass
class Showcase:
    """Training runs and the local stack that watches them."""

    workdir: Path
    scenarios: Sequence[str] = tuple(EXPECTED)
    # Healthy scenarios whose runs end early, close the exporter and exit: no hung or target-down alert.
    finishing: Sequence[str] = ()
    steps: int = 3000
    step_time: float = 0.05
    thresholds: Path = THRESHOLDS
    # Below this many free bytes in the working folder the showcase stops: Prometheus and Alertmanager would
    # lose data without a word.
    min_free: int = 64 << 20
    runs: List[DemoRun] = field(default_factory=list)
    arrivals: Dict[tuple, Arrival] = field(default_factory=dict)

    def start(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        runs_dir = self.workdir / "runs"
        self.runs = [DemoRun(s, f"demo-{s}", free_port(), runs_dir, steps=self.steps, step_time=self.step_time,
                             linger=3600) for s in self.scenarios]
        self.runs += [DemoRun(s, f"demo-{s}-finished", free_port(), runs_dir, steps=self.steps // 4,
                              step_time=self.step_time, linger=3) for s in self.finishing]
        self.pushgateway = Pushgateway(self.workdir / "pushgateway")
        self.stack = LocalStack(self.workdir / "stack", self.thresholds, [r.target for r in self.runs],
                                extra_targets={"pushgateway": [f"127.0.0.1:{self.pushgateway.port}"]})
        self.stack.__enter__()
        self.pushgateway.wait_ready()
        self.started = time.time()

    def stop(self) -> None:
        for run in self.runs:
            run.stop()
        for server in ("stack", "pushgateway"):
            if hasattr(self, server):
                getattr(self, server).stop()

    def poll(self) -> List[Arrival]:
        """Alerts Alertmanager holds now that were not seen before (inhibited ones included, marked so)."""
        new = []
        for alert in json.loads(http_get(self.stack.alertmanager.url + "/api/v2/alerts")):
            labels = alert["labels"]
            key = (labels.get("run"), labels.get("alertname"))
            if key in self.arrivals:
                continue
            arrival = Arrival(labels.get("alertname", ""), labels.get("run", ""), labels.get("severity", ""),
                              alert["status"]["state"], time.time(), alert["annotations"].get("description", ""))
            self.arrivals[key] = arrival
            new.append(arrival)
        return new

    def watch(self, limit: float, on_arrival: Optional[Callable[[Arrival], None]] = None,
              on_progress: Optional[Callable[[str], None]] = None, progress_every: float = 10.0) -> None:
        """Poll Alertmanager until every expected alert arrived and the runs ended, or ``limit`` seconds passed
        since the start."""
        last_progress = 0.0
        while time.time() - self.started < limit and not self.finished():
            self.check()
            for arrival in self.poll():
                if on_arrival is not None:
                    on_arrival(arrival)
            if on_progress is not None and time.time() - last_progress >= progress_every:
                last_progress = time.time()
                on_progress(self.progress())
            time.sleep(0.5)
        self.poll()

    def check(self) -> None:
        """Raise ``OSError`` when the working folder's disk is nearly full, ``RuntimeError`` when a server died."""
        free = shutil.disk_usage(self.workdir).free
        if free < self.min_free:
            raise OSError(f"the demo's data folder {self.workdir} has {free >> 20} MiB free, "
                          f"less than the {self.min_free >> 20} MiB it needs")
        for server in (self.stack.prometheus, self.stack.alertmanager, self.pushgateway):
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}: "
                                   f"{' '.join(server.log_tail(300).split())}")

    def fired(self, run: DemoRun) -> Dict[str, Arrival]:
        return {a.alertname: a for (r, _), a in self.arrivals.items() if r == run.run}

    def unexpected(self, run: DemoRun) -> List[str]:
        """Alerts of ``run`` that page (warning, critical) but are neither its pathology's nor also true of it. An
        info alert is no page: a demo run converges within minutes, and the plateau rule says so (converged or
        stuck)."""
        allowed = {EXPECTED.get(run.scenario)} | ALSO_TRUE.get(run.scenario, set())
        return sorted(name for name, a in self.fired(run).items() if a.severity != "info" and name not in allowed)

    def missing(self) -> List[str]:
        """Runs whose expected alert has not arrived yet."""
        return [r.run for r in self.runs if EXPECTED.get(r.scenario) and EXPECTED[r.scenario] not in self.fired(r)]

    def finished(self) -> bool:
        """Every expected alert arrived and every run that can end has ended."""
        ended = all(r.scenario in ("hang", "crash") or b"completed at step" in r.log_path.read_bytes()
                    for r in self.runs)
        return ended and not self.missing()

    def delay(self, run: DemoRun, arrival: Arrival) -> float:
        """Seconds from the injected fault (or the run's start, for overfitting) to the alert's arrival."""
        return arrival.seen - (run.fault_time() or run.started)

    def progress(self) -> str:
        rows = {r["metric"]["run"]: r["value"] for r in self.stack.prometheus.query('training_step{job="training"}')}
        return "  ".join(f"{r.scenario}:{int(rows[r.run]) if r.run in rows else '-'}" for r in self.runs)

    def summary(self) -> str:
        lines = [f"{'run':<14} {'scenario':<9} {'alerts (seconds from fault or start to Alertmanager)'}"]
        for run in self.runs:
            fired = self.fired(run)
            text = ", ".join(f"{name} {self.delay(run, a):.0f}s" + (" (inhibited)" if a.state == "suppressed" else "")
                             for name, a in sorted(fired.items(), key=lambda kv: kv[1].seen)) or "none"
            expected = EXPECTED.get(run.scenario)
            if expected and expected not in fired:
                verdict = "MISSING"
            else:
                verdict = "UNEXPECTED" if self.unexpected(run) else "ok"
            lines.append(f"{run.run:<14} {run.scenario:<9} {text}  [{verdict}]")
        return "\n".join(lines)

    def push_summary(self) -> None:
        """Publish the detection delays to the Pushgateway, as a batch job publishes its result."""
        from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

        registry = CollectorRegistry()
        gauge = Gauge("training_demo_detection_delay_seconds", "Seconds from a demo run's fault to its alert.",
                      ["run", "alertname"], registry=registry)
        for run in self.runs:
            for name, arrival in self.fired(run).items():
                gauge.labels(run.run, name).set(self.delay(run, arrival))
        push_to_gateway(self.pushgateway.url.replace("http://", ""), job="training-demo", registry=registry)


def main(duration: Optional[float] = None, workdir: Path = Path(".demo"), interactive: Optional[bool] = None,
         steps: int = 3000) -> int:
    """Run the showcase; interactive (a terminal, no duration) it keeps the stack up until Ctrl-C."""
    interactive = sys.stdin.isatty() and duration is None if interactive is None else interactive
    limit = duration if duration is not None else 600.0
    show = Showcase(workdir=workdir.resolve(), steps=steps)
    print(f"starting {len(show.scenarios)} training runs and Prometheus, Alertmanager, Pushgateway in {show.workdir}",
          flush=True)
    with stop_on_signals():
        return _run(show, limit, interactive)


def _run(show: Showcase, limit: float, interactive: bool) -> int:
    try:
        show.start()
        print(f"Prometheus   {show.stack.prometheus.url}\nAlertmanager {show.stack.alertmanager.url}\n"
              f"Pushgateway  {show.pushgateway.url}", flush=True)
        for run in show.runs:
            print(f"exporter     http://{run.target}/metrics  ({run.run}: {run.scenario})", flush=True)
        def arrived(a: Arrival) -> None:
            inhibited = " (inhibited)" if a.state == "suppressed" else ""
            print(f"[{a.seen - show.started:5.0f}s] ALERT {a.alertname} ({a.severity}){inhibited} "
                  f"run {a.run}: {a.description}", flush=True)

        show.watch(limit, arrived, lambda line: print(f"[{time.time() - show.started:5.0f}s] steps  {line}",
                                                      flush=True))
        print("\nsummary\n" + show.summary(), flush=True)
        show.push_summary()
        if interactive:
            print("\nthe stack stays up: press Ctrl-C to stop it", flush=True)
            while True:
                time.sleep(1)
                show.check()
                show.poll()
    except KeyboardInterrupt as exc:
        print(f"\nstopping ({exc})" if isinstance(exc, Stopped) else "\nstopping", flush=True)
    except (OSError, RuntimeError) as exc:  # a full disk, a server that died: say why, then stop the rest
        print(f"error: {exc}; stopping", file=sys.stderr, flush=True)
        return 1
    finally:
        show.stop()
        print(f"stopped every process; files are in {show.workdir}", flush=True)
    return 0 if not show.missing() else 1
