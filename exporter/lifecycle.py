"""The run's lifecycle in the training process: its phases, SIGTERM, and the status a ``with`` block ends with.

The rules give each phase its own allowance before a run counts as hung: start-up (from the exporter's start
to the first step), training (adapted to the run's own step time), and what the loop marks with
``exp.phase("eval")``, ``exp.phase("checkpoint")``, ...
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Iterable, Optional

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .metrics import BASE_LABELS, METRICS
from .server import wait_final_scrapes

log = logging.getLogger("exporter")

STARTUP, TRAIN = "startup", "train"
MAX_PHASES = 16  # distinct phase names; more become "other" (a phase is a label value)
_PHASE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_PHASE_METRIC = "training_phase_start_timestamp_seconds"
_PROGRESS_METRIC = "training_last_progress_timestamp_seconds"


class Phases(Collector):
    """The current phase and the Unix time it began, served as one series labelled with the phase, and the
    run's last progress: the latest of that time and ``progress()`` (its last step or evaluation), so the hang
    rule reads one series per rank.

    A run starts in ``startup``; its first step moves it to ``train``. ``enter(name)`` switches at once and
    returns a context manager that switches back to the phase before it, whose clock then starts again.
    """

    def __init__(self, base: tuple, dropped: Callable[[], None], lock: Any,
                 progress: Callable[[], Optional[float]]) -> None:
        self._base = base
        self._progress = progress
        self._dropped = dropped  # counts a name published as "other" in training_exporter_dropped_total
        # The run state's lock, not one of its own: a SIGTERM landing inside it is then deferred like one landing
        # in log_step (a lock the handler does not know of would block the final scrape).
        self._lock = lock
        self._known = {STARTUP, TRAIN}
        self.name = STARTUP
        self.since = time.time()

    def enter(self, name: str) -> "PhaseBlock":
        if not isinstance(name, str) or not _PHASE_NAME.match(name):
            raise ValueError(f"phase(): name must be a short lower-case word such as 'eval' or 'checkpoint' "
                             f"(letters, digits, _), got {name!r}")
        with self._lock:
            if name not in self._known:
                if len(self._known) >= MAX_PHASES:
                    log.warning("training exporter: more than %d phase names; %r is published as 'other'",
                                MAX_PHASES, name)
                    name = "other"
                    self._dropped()
                else:
                    self._known.add(name)
            previous = self.name
            self._switch(name)
        return PhaseBlock(self, previous)

    def leave(self, previous: str) -> None:
        with self._lock:
            self._switch(previous)

    def stepped(self) -> None:
        """A step completed: start-up is over."""
        if self.name == STARTUP:
            with self._lock:
                if self.name == STARTUP:
                    self._switch(TRAIN)

    def _switch(self, name: str) -> None:
        self.name, self.since = name, time.time()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        phase, progress = METRICS[_PHASE_METRIC], METRICS[_PROGRESS_METRIC]
        families = (GaugeMetricFamily(phase.name, phase.help, labels=BASE_LABELS + phase.labels),
                    GaugeMetricFamily(progress.name, progress.help, labels=BASE_LABELS))
        with self._lock:
            families[0].add_metric(self._base + (self.name,), self.since)
            families[1].add_metric(self._base, max(self.since, self._progress() or self.since))
        return list(families)


class PhaseBlock:
    """Returned by ``phase()``: the phase is already current; leaving the ``with`` block restores the one
    before."""

    def __init__(self, phases: Phases, previous: str) -> None:
        self._phases = phases
        self._previous = previous

    def __enter__(self) -> "PhaseBlock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._phases.leave(self._previous)


class SigtermHandler:
    """On SIGTERM, publishes that the run was interrupted, then hands the signal to the handler installed
    before (torchrun's, Slurm tooling's, the default that ends the process), so their behaviour is unchanged.

    ``interrupt(final)`` closes the run as interrupted; ``final`` is true when the previous handler is the
    default one, which ends the process right after, so the exporter lets Prometheus scrape the end first.
    ``defer(work)`` postpones the whole handler while the training thread is inside the exporter's lock.
    """

    def __init__(self, interrupt: Callable[[bool], None], defer: Callable[[Callable[[], None]], bool]) -> None:
        self._interrupt = interrupt
        self._defer = defer
        self._previous: Any = None
        self.installed = False
        self.received = False
        # What the previous handler raised: it may surface inside the exporter's own code, which must pass it on.
        self.forwarded: Optional[BaseException] = None

    def install(self) -> bool:
        """Install in the main thread; elsewhere, or over an ignored or foreign handler, do nothing."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("training exporter: not in the main thread; SIGTERM is not handled")
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None or previous == signal.SIG_IGN:
            return False  # set outside Python, or ignored: the process does not end on SIGTERM
        self._previous = previous
        signal.signal(signal.SIGTERM, self)
        self.installed = True
        return True

    def uninstall(self) -> None:
        """Restore the previous handler if ours is still the current one; otherwise ours only forwards."""
        if self.installed:
            self.installed = False
            if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is self:
                signal.signal(signal.SIGTERM, self._previous)

    def __call__(self, signum: int, frame: Any) -> None:
        # Inside the lock, closing would land halfway through an update and the wait for the final scrape
        # would hold the lock that scrape needs: all of it (previous handler included, so that the order stays
        # publish-then-chain) runs once the training thread leaves the lock, at the end of the exporter call.
        if self._defer(lambda: self(signum, frame)):
            return
        final = self._previous == signal.SIG_DFL
        if self.installed and not self.received:
            self.received = True
            try:
                self._interrupt(final)
            except Exception as exc:  # publishing must never stop the signal from taking effect
                log.error("training exporter: could not publish the interruption", exc_info=exc)
        if final:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            try:
                self._previous(signum, frame)
            except BaseException as exc:
                self.forwarded = exc
                raise


def exit_status(exc_type: Optional[type], exc: Optional[BaseException], interrupted: bool = False) -> str:
    """The status a ``with TrainingExporter(...)`` block ends with: ``sys.exit(0)`` is a completed run."""
    if interrupted or (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
        return "interrupted"
    if exc_type is None:
        return "completed"
    if issubclass(exc_type, SystemExit) and getattr(exc, "code", None) in (0, None):
        return "completed"
    return "failed"


class Lifecycle:
    """What ``TrainingExporter`` delegates to: phases, SIGTERM and the exit status of its ``with`` block."""

    def __init__(self, state: Any, registry: CollectorRegistry, close: Callable[[str], None],
                 handle_sigterm: bool) -> None:
        self._state = state
        self._close = close
        self.phases = Phases(state.base, self._dropped_phase, state.lock, state.last_progress)
        registry.register(self.phases)
        self._sigterm = SigtermHandler(self._interrupted, state.lock.defer)
        if handle_sigterm:
            self._sigterm.install()

    def phase(self, name: str) -> PhaseBlock:
        return self.phases.enter(name)

    def stepped(self) -> None:
        self.phases.stepped()

    def exit_status(self, exc_type: Optional[type], exc: Optional[BaseException]) -> str:
        return exit_status(exc_type, exc, self._sigterm.received)

    def close(self) -> None:
        self._sigterm.uninstall()

    @property
    def forwarded(self) -> Optional[BaseException]:
        """The exception SIGTERM's previous handler raised, if any."""
        return self._sigterm.forwarded

    def _dropped_phase(self) -> None:
        with self._state.lock:
            self._state.dropped["phase"] += 1

    def _interrupted(self, final: bool) -> None:
        """The run ends here, whatever the previous handler does next: when it returns and the loop goes on
        (a checkpoint-and-requeue handler), the steps it still logs change nothing that was published."""
        with self._state.lock:
            if self._state.status != "running":
                return
        self._close("interrupted")
        log.warning("training exporter: SIGTERM received; run %r rank %s published status 'interrupted'",
                    *self._state.base)
        if final:
            # The default action ends the process right after, without atexit: wait here (each exporter at
            # most its close_timeout, all together) for the scrapes that tell Prometheus the runs ended.
            wait_final_scrapes()
