"""The host-side state of one training process and the collector that serves it at scrape time."""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from . import device_stats as ds
from .exposition import FamilyFormat, RenderedFamily
from .metrics import (BASE_LABELS, DROP_KINDS, ERROR_SITES, EVAL_NOISE_BEND, EVAL_NOISE_HISTORY, EVAL_NOISE_MIN,
                      METRICS, RUN_STATUSES)

log = logging.getLogger("exporter")

_BUCKETS = 16
# Served by other collectors of the exporter (lifecycle.Phases).
_ELSEWHERE = ("training_phase_start_timestamp_seconds", "training_last_progress_timestamp_seconds")


class TrainingLock:
    """The re-entrant lock guarding ``RunState``; it knows whether the main thread is inside it.

    A signal handler runs in the main thread between two bytecodes, possibly while the training thread holds
    this lock halfway through an update. Work that must not happen there (closing the run mid-update, then
    waiting for a scrape that needs this lock to render: a deadlock) is handed to ``defer()``, which runs it
    when the main thread leaves its outermost ``with``. Deferring rather than rendering without the lock keeps
    every scrape a consistent copy, and the wait is never longer than the rest of one exporter call.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # How deep the main thread is inside, counted before acquiring and after releasing, so that a signal
        # landing between the count and the lock operation defers too (the deferred work then runs at once).
        self._main_depth = 0
        self._deferred: Optional[Callable[[], None]] = None

    def __enter__(self) -> "TrainingLock":
        if threading.current_thread() is threading.main_thread():
            self._main_depth += 1
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
        if threading.current_thread() is threading.main_thread():
            self._main_depth -= 1
            if self._main_depth == 0 and self._deferred is not None:
                deferred, self._deferred = self._deferred, None
                deferred()

    def defer(self, work: Callable[[], None]) -> bool:
        """From a signal handler: if the main thread is inside the lock, run ``work`` once it has left it and
        return True (a second call before then is dropped: the first one's work already runs); otherwise False,
        and the caller does the work itself."""
        if self._main_depth == 0:
            return False
        if self._deferred is None:
            self._deferred = work
        return True


class RunState(Collector):
    """Everything one process publishes, guarded by ``lock``; ``collect()`` serves a consistent copy.

    ``refresh`` runs first at every scrape (the exporter takes completed device reads there), so a scrape
    shows the latest values even while the training thread is busy.
    """

    def __init__(self, run: str, rank: int, info: Dict[str, str], max_window: float,
                 refresh: Optional[Callable[[], None]] = None) -> None:
        self.lock = TrainingLock()
        self.base = (run, str(rank))
        self.info = dict(info)
        self.max_window = max_window
        self.refresh = refresh
        self.status = "running"
        self.start_time = time.time()
        self.step = 0
        self.epoch = 0
        self.last_step_time: Optional[float] = None
        self.losses: Dict[str, float] = {}
        self.lrs: Dict[str, float] = {}
        self.grad_norm: Optional[float] = None
        self.grad_shard_sq: Optional[float] = None
        self.grad_mean: Optional[float] = None
        self.layer_norms: Dict[str, float] = {}
        self.eval_metrics: Dict[Tuple[str, str], float] = {}
        self.eval_steps: Dict[str, int] = {}
        self.eval_times: Dict[str, float] = {}
        self.evals: Dict[str, int] = {}
        self.eval_best: Dict[str, float] = {}
        self.evals_since_best: Dict[str, int] = {}
        self._eval_history: Dict[str, collections.deque] = {}
        self.eval_noise: Dict[str, float] = {}
        self.samples = 0.0
        self.duration_sum = 0.0
        self.duration_count = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.loss_pos = 0.0
        self.loss_neg = 0.0
        self.loss_sq = 0.0
        self.grad_count = 0
        self.grad_sum = 0.0
        self.last_nonfinite_time: Optional[float] = None
        self.loss_nonfinite = 0
        self.grad_nonfinite = 0
        self.skipped = 0
        self.errors = dict.fromkeys(ERROR_SITES, 0)
        self.dropped = dict.fromkeys(DROP_KINDS, 0)
        # [first, last snapshot time, largest finite loss, largest finite grad norm] of time buckets of
        # max_window / _BUCKETS seconds, newest last: bounded whatever the number of steps between two scrapes.
        self._recent: collections.deque = collections.deque()
        info_names = METRICS["training_run_info"].labels + tuple(sorted(set(self.info) - set(
            METRICS["training_run_info"].labels)))
        self._info_values = tuple(self.info[k] for k in info_names)
        self._formats = {m.name: FamilyFormat(m.name, m.help, m.type, BASE_LABELS + m.labels, self.base)
                         for m in METRICS.values() if m.name not in _ELSEWHERE}
        self._formats["training_run_info"] = FamilyFormat("training_run_info", METRICS["training_run_info"].help,
                                                          "gauge", BASE_LABELS + info_names, self.base)

    def last_progress(self) -> Optional[float]:
        """The time of the latest step or evaluation, if any. Call with ``lock`` held."""
        return max((t for t in (self.last_step_time, *self.eval_times.values()) if t is not None), default=None)

    def merge_steps(self, values: np.ndarray, when: float) -> None:
        """Fold a ``StepAccumulator`` snapshot (taken at ``when``) into the totals. Call with ``lock`` held."""
        self.loss_sum += float(values[ds.SUM, ds.LOSS])
        self.loss_count += int(values[ds.COUNT, ds.LOSS])
        self.loss_pos += float(values[ds.POS, ds.LOSS])
        self.loss_neg += float(values[ds.NEG, ds.LOSS])
        self.loss_sq += float(values[ds.SQ, ds.LOSS])
        self.grad_count += int(values[ds.COUNT, ds.GRAD])
        self.grad_sum += float(values[ds.SUM, ds.GRAD])
        self.loss_nonfinite += int(values[ds.NONFINITE, ds.LOSS])
        self.grad_nonfinite += int(values[ds.NONFINITE, ds.GRAD])
        self.skipped += int(values[ds.SKIPPED, ds.GRAD])
        if values[ds.NONFINITE].sum() > 0:
            self.last_nonfinite_time = when
        if values[ds.COUNT, ds.LOSS] + values[ds.NONFINITE, ds.LOSS] > 0:
            self.losses["train"] = float(values[ds.LAST, ds.LOSS])
        if values[ds.COUNT, ds.GRAD] + values[ds.NONFINITE, ds.GRAD] > 0:
            self.grad_norm = float(values[ds.LAST, ds.GRAD])
        loss_max, grad_max = float(values[ds.MAX, ds.LOSS]), float(values[ds.MAX, ds.GRAD])
        newest = self._recent[-1] if self._recent else None
        if newest is not None and when < newest[0] + self.max_window / _BUCKETS:
            newest[1:] = [when, max(newest[2], loss_max), max(newest[3], grad_max)]
        else:
            self._recent.append([when, when, loss_max, grad_max])
            if len(self._recent) > _BUCKETS + 1:
                self._recent.popleft()

    def eval_loss(self, split: str, loss: float) -> None:
        """Publish an evaluation's loss and track the split's best one. Call with ``lock`` held."""
        self.losses[split] = loss
        if math.isfinite(loss) and loss < self.eval_best.get(split, math.inf):
            self.eval_best[split] = loss
            self.evals_since_best[split] = 0
        elif split in self.evals_since_best:
            self.evals_since_best[split] += 1
        if math.isfinite(loss):  # a NaN evaluation says nothing about the spread of the others
            history = self._eval_history.setdefault(split, collections.deque(maxlen=EVAL_NOISE_HISTORY))
            history.append(loss)
            if len(history) >= EVAL_NOISE_MIN:
                noise = eval_noise(history)
                # Kept once shown: a later bend of the curve only inflates it, which errs on the quiet side.
                if split in self.eval_noise or noise <= EVAL_NOISE_BEND * eval_noise(history, order=2):
                    self.eval_noise[split] = noise

    def recent_max(self, now: float) -> Tuple[float, float]:
        """Largest finite loss and grad norm of the steps within ``max_window`` seconds (a bucket with a step in
        the window counts whole); the newest bucket is always kept."""
        while len(self._recent) > 1 and self._recent[0][1] < now - self.max_window:
            self._recent.popleft()
        loss = max((r[2] for r in self._recent), default=-math.inf)
        grad = max((r[3] for r in self._recent), default=-math.inf)
        return loss, grad

    def collect(self) -> List[Metric]:
        if self.refresh is not None:
            self.refresh()
        with self.lock:
            values = self._values()
        # Rendering holds the GIL but not the lock: log_step never waits for a scrape's formatting.
        return [self._formats[name].render(series) for name, series in values]

    def _values(self) -> List[Tuple[str, Dict]]:
        """Each family's series as {label values beyond run and rank: value}; copies, so that they are rendered
        after the lock is released. Call with ``lock`` held."""
        def single(name: str, value) -> Tuple[str, Dict]:
            return name, ({} if value is None else {(): value})

        loss_max, grad_max = self.recent_max(time.time())
        return [
            single("training_step", self.step),
            single("training_epoch", self.epoch),
            single("training_last_step_timestamp_seconds", self.last_step_time),
            ("training_loss", dict(self.losses)),
            ("training_learning_rate", dict(self.lrs)),
            single("training_grad_norm", self.grad_norm),
            ("training_eval_metric", dict(self.eval_metrics)),
            ("training_run_info", {self._info_values: 1}),
            ("training_run_status", {s: float(s == self.status) for s in RUN_STATUSES}),
            single("training_run_start_timestamp_seconds", self.start_time),
            single("training_step_loss", (self.loss_count, self.loss_sum)),
            single("training_loss_steps_total", self.loss_count),
            single("training_loss_positive_sum_total", self.loss_pos),
            single("training_loss_negative_sum_total", self.loss_neg),
            single("training_loss_squared_sum_total", self.loss_sq),
            single("training_grad_norm_steps_total", self.grad_count),
            single("training_grad_norm_sum_total", self.grad_sum),
            single("training_last_nonfinite_timestamp_seconds", self.last_nonfinite_time),
            single("training_loss_recent_max", loss_max if loss_max > -math.inf else None),
            single("training_grad_norm_recent_max", grad_max if grad_max > -math.inf else None),
            single("training_loss_nonfinite_total", self.loss_nonfinite),
            single("training_grad_nonfinite_total", self.grad_nonfinite),
            single("training_scaler_skipped_steps_total", self.skipped),
            single("training_samples_total", self.samples),
            single("training_step_duration_seconds", (self.duration_count, self.duration_sum)),
            ("training_eval_step", dict(self.eval_steps)),
            ("training_eval_timestamp_seconds", dict(self.eval_times)),
            ("training_evals_total", dict(self.evals)),
            ("training_eval_loss_best", dict(self.eval_best)),
            ("training_evals_since_best", dict(self.evals_since_best)),
            ("training_eval_loss_noise", dict(self.eval_noise)),
            single("training_grad_norm_shard_squared", self.grad_shard_sq),
            single("training_grad_mean", self.grad_mean),
            ("training_layer_grad_norm", dict(self.layer_norms)),
            ("training_exporter_errors_total", dict(self.errors)),
            ("training_exporter_dropped_total", dict(self.dropped)),
        ]


def eval_noise(losses, order: int = 1) -> float:
    """Standard deviation of one evaluation's loss around its curve, from the differences of ``order`` of
    consecutive evaluations (Rice's estimator at order 1): an order-k difference of independent noise has
    C(2k, k) times its variance, and the mean of the differences (a trend of degree k) is left out. So a val loss
    that rises steadily (the overfitting it is compared with) does not read as noise at order 1, nor a steadily
    bending one at order 2; a bend within the history inflates the order-1 estimate far more than the order-2 one."""
    x = [float(v) for v in losses]
    for _ in range(order):
        x = [b - a for a, b in zip(x, x[1:])]
    mean = math.fsum(x) / len(x)
    return math.sqrt(math.fsum((d - mean) ** 2 for d in x) / (len(x) - 1) / math.comb(2 * order, order))


class Publisher(Collector):
    """The exporters' collectors of one registry, served as one collector.

    Exporters that share a registry publish one family per metric name carrying every run's series, as one
    exporter per registry does. A series that two of them serve (a run and rank given twice, as a sweep may do)
    comes from the newest, as when a new exporter takes a port over. ``Publisher.of(registry)`` gives the
    registry's publisher, and ``register`` takes collectors as a registry does.
    """

    _of: "weakref.WeakKeyDictionary[CollectorRegistry, Publisher]" = weakref.WeakKeyDictionary()
    _of_lock = threading.Lock()

    def __init__(self) -> None:
        self._members: List[Collector] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, registry: CollectorRegistry) -> "Publisher":
        with cls._of_lock:
            publisher = cls._of.get(registry)
            if publisher is None:
                publisher = cls._of[registry] = cls()
                registry.register(publisher)
            return publisher

    def register(self, collector: Collector) -> None:
        with self._lock:
            if isinstance(collector, RunState) and any(isinstance(m, RunState) and m.base == collector.base
                                                       and m.status == "running" for m in self._members):
                log.warning("training exporter: the registry passed already serves the running run %r rank %s; "
                            "the newer exporter's series replace the older one's", *collector.base)
            self._members.append(collector)

    def collect(self) -> List[Metric]:
        with self._lock:
            members = list(self._members)
        families: Dict[str, List[Metric]] = {}
        for member in reversed(members):  # the newest first: its series win
            for family in member.collect():
                families.setdefault(family.name, []).append(family)
        return [_merged(same) for same in families.values()]


def _merged(families: List[Metric]) -> Metric:
    if len(families) == 1:
        return families[0]
    if all(isinstance(f, RenderedFamily) for f in families):
        return RenderedFamily.merged(families)
    first = families[0]
    merged = Metric(first.name, first.documentation, first.type, first.unit)
    seen = set()
    for sample in (s for f in families for s in f.samples):
        series = (sample.name, tuple(sorted(sample.labels.items())))
        if series not in seen:
            seen.add(series)
            merged.samples.append(sample)
    return merged
