"""A run generator: the real exporter driven step by step on a simulated clock, scraped like Prometheus would.

A corpus run is described by its inputs only (curves, cadences, events; see ``tests/corpus/corpus.yaml``):
``scrape_series`` builds the per-step train loss, gradient norm and learning rate, calls
``TrainingExporter.log_step``/``log_eval`` for every step and evaluation at simulated times, and reads the text
exposition (``generate_latest``) at every scrape. So the series are exactly what the exporter serves today.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, TextIO, Tuple

import numpy as np

from .thresholds import duration_seconds

Series = Dict[str, List[Optional[float]]]
_RATE = re.compile(r"^\s*([0-9.]+)\s*/\s*(s|min|h)\s*$")
_PER = {"s": 1.0, "min": 60.0, "h": 3600.0}


def _seconds(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else duration_seconds(str(value))


@dataclass
class Run:
    """One corpus run: its cadences, curves, pathology and events, as written in the corpus file."""

    name: str
    half: str
    seed: int
    rate: float  # steps per second
    scrape: float  # seconds
    duration: float  # seconds
    eval_steps: Optional[int]  # evaluate every this many steps ...
    eval_seconds: Optional[float]  # ... or every this many seconds
    loss: Mapping[str, Any]
    grad: Mapping[str, Any]
    schedule: Mapping[str, Any]
    pathology: Optional[Mapping[str, Any]]
    events: Mapping[str, Any] = field(default_factory=dict)
    namespace: str = "ns-a"
    twin: Optional[Mapping[str, Any]] = None  # a second run with the same name in another namespace
    expect: Tuple[str, ...] = ()  # a lifecycle row's alerts: each must fire for this run, no other may
    recorded: Optional[Path] = None  # a real training's recording, replayed instead of shaped curves

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: Optional[Path] = None) -> "Run":
        """A run as the corpus file writes it; ``recorded: NAME`` names ``<root>/recorded/NAME.json``."""
        m = _RATE.match(str(d["rate"]))
        if m is None:
            raise ValueError(f"{d['name']}: rate must read like 1/min, 1/s or 50/s, got {d['rate']!r}")
        every = d.get("eval", "100")
        steps = int(every) if str(every).isdigit() else None
        return cls(name=d["name"], half=d["half"], seed=int(d["seed"]), rate=float(m.group(1)) / _PER[m.group(2)],
                   scrape=_seconds(d["scrape"]), duration=_seconds(d["duration"]), eval_steps=steps,
                   eval_seconds=None if steps else _seconds(every), loss=d.get("loss", {}), grad=d.get("grad", {}),
                   schedule=d.get("schedule", {}), pathology=d.get("pathology"), events=d.get("events", {}),
                   namespace=d.get("namespace", "ns-a"), twin=d.get("twin"), expect=tuple(d.get("expect", ())),
                   recorded=Path(root or ".") / "recorded" / f"{d['recorded']}.json" if "recorded" in d else None)

    @property
    def onset(self) -> Optional[float]:
        return None if self.pathology is None else _seconds(self.pathology["at"])

    @property
    def eval_interval(self) -> float:
        """Seconds between evaluations."""
        return self.eval_seconds if self.eval_seconds else self.eval_steps / self.rate

    def cadence(self) -> str:
        per_min = self.rate * 60
        rate = f"{per_min:g}/min" if per_min < 60 else f"{self.rate:g}/s"
        every = f"{self.eval_steps} steps" if self.eval_steps else f"{self.eval_seconds / 3600:g} h"
        return f"{rate}, scrape {self.scrape:g}s, eval every {every}"


# ------------------------------------------------------------------------------------------------- curves
def _lr(run: Run, t: np.ndarray) -> np.ndarray:
    """The learning rate at times ``t``: warmup then constant, cosine, stable-then-decay, steps or restarts."""
    s = run.schedule
    peak, kind = float(s.get("lr", 1e-3)), s.get("kind", "constant")
    warm = _seconds(s.get("warmup", 0))
    x = np.clip(t / run.duration, 0, 1)
    if kind == "constant":
        lr = np.full_like(t, peak)
    elif kind == "cosine":
        lr = peak * 0.5 * (1 + np.cos(math.pi * x))
    elif kind == "wsd":  # warmup, stable, decay over the last `decay` fraction
        d = float(s.get("decay", 0.2))
        lr = peak * np.clip((1 - x) / d, 0, 1)
    elif kind == "step":  # divided by 10 at each listed fraction of the run
        lr = peak * 0.1 ** sum((x >= f).astype(float) for f in s.get("at", [0.5, 0.8]))
    elif kind == "restarts":  # cosine restarted every `period`
        period = _seconds(s.get("period", "1h"))
        lr = peak * 0.5 * (1 + np.cos(math.pi * (t % period) / period))
    else:
        raise ValueError(f"{run.name}: unknown schedule {kind!r}")
    if warm:
        lr = lr * np.clip(t / warm, 0.01, 1)
    return lr


def recording(run: Run) -> Dict[str, Any]:
    """The real training ``run`` replays, checked against its cadence."""
    rec = json.loads(Path(run.recorded).read_text())
    if int(run.duration * run.rate) > rec["steps"] or run.eval_steps != rec["eval_every"]:
        raise ValueError(f"{run.name}: its recording has {rec['steps']} steps evaluated every {rec['eval_every']}; "
                         f"the run needs {int(run.duration * run.rate)} evaluated every {run.eval_steps}")
    return rec


def _recorded(run: Run) -> Dict[str, np.ndarray]:
    """The curves of a real training: every step's values as recorded, each evaluation's from its step on."""
    rec = recording(run)
    n = int(run.duration * run.rate)
    at = np.searchsorted(np.asarray(rec["eval_step"]) - 1, np.arange(n), side="right") - 1  # latest eval so far
    held = lambda xs: np.where(at >= 0, np.asarray(xs)[np.maximum(at, 0)], math.nan)  # noqa: E731
    return {"t": np.arange(n) / run.rate, "loss": np.asarray(rec["loss"][:n]), "grad": np.asarray(rec["grad_norm"][:n]),
            "lr": np.asarray(rec["lr"][:n]), "val": held(rec["eval_loss"]), "accuracy": held(rec["eval_accuracy"]),
            "scale": np.array(1.0)}


def curves(run: Run) -> Dict[str, np.ndarray]:
    """Per-step train loss, gradient norm and learning rate, and the noise-free val loss (for evaluations)."""
    if run.recorded is not None:
        return _recorded(run)
    rng = np.random.default_rng(run.seed)
    n = int(run.duration * run.rate)
    t = np.arange(n) / run.rate
    lr = _lr(run, t)
    L = run.loss
    start, end = float(L.get("start", 3.0)), float(L.get("end", 1.0))
    tau = _seconds(L.get("tau", run.duration / 4))
    scale = abs(start - end) or 1.0
    # The level falls exponentially; a higher learning rate holds it up (so steps, restarts and decays show).
    level = end + (start - end) * np.exp(-t / tau) + float(L.get("lr_effect", 0.1)) * scale * lr / lr.max()
    noise = float(L.get("noise", 0.02)) * scale
    g = run.grad
    grad_level = float(g.get("level", 1.0)) * (1 + 0.5 * np.exp(-t / tau))
    grad = grad_level * np.exp(rng.normal(0, float(g.get("noise", 0.2)), n))
    out = {"t": t, "lr": lr, "level": level, "grad": grad}
    p = run.pathology
    if p is not None:
        _inject(run, p, out, scale, noise)
    out["loss"] = out["level"] + rng.normal(0, noise, n)
    if p is not None and p["kind"] == "spike":
        out["loss"][out.pop("spike")] += float(p.get("size", 5.0)) * scale
    if p is not None and p["kind"] == "nan":
        out["loss"][out.pop("nan")] = math.nan
    out["scale"] = np.array(scale)
    out["val"] = out["level"] + float(L.get("gap", 0.1)) * scale + out.pop("val_rise", 0.0)
    return out


def _inject(run: Run, p: Mapping[str, Any], out: Dict[str, np.ndarray], scale: float, noise: float) -> None:
    """Change the healthy curves from the onset on, as the pathology ``p`` does."""
    t, onset, kind = out["t"], _seconds(p["at"]), p["kind"]
    after = t >= onset
    since = np.where(after, t - onset, 0.0)
    over = _seconds(p.get("over", "1h"))
    if kind == "diverge":  # the level climbs by `rise` loss scales over `over`, from the level at onset
        out["level"] = np.where(after, out["level"][np.argmax(after)] + float(p["rise"]) * scale * since / over,
                                out["level"])
    elif kind == "plateau":  # the level stops falling (it creeps by `creep` scales per `over`); the LR stays high
        # (`frozen: true`: the weights stop changing, so every evaluation repeats the first one after the onset,
        # its noise included; see scrape_series)
        at = np.argmax(after)
        out["level"] = np.where(after, out["level"][at] - float(p.get("creep", 0.0)) * scale * since / over,
                                out["level"])
    elif kind == "spike":  # `steps` consecutive steps (at least one) lifted by `size` scales
        first = int(np.argmax(after))
        out["spike"] = np.arange(first, min(first + int(p.get("steps", 1)), len(t)))
    elif kind == "explode":  # gradient norm multiplied by `factor` for `burst` (a burst), or growing to it over `over`
        factor = float(p["factor"])
        if "burst" in p:
            out["grad"] = np.where(after & (since < _seconds(p["burst"])), out["grad"] * factor, out["grad"])
        else:
            out["grad"] = out["grad"] * np.where(after, factor ** np.minimum(since / over, 1.0), 1.0)
    elif kind == "nan":  # `steps` NaN losses from the onset (all: every step after it)
        first = int(np.argmax(after))
        count = len(t) - first if p.get("steps") == "all" else int(p.get("steps", 1))
        out["nan"] = np.arange(first, min(first + count, len(t)))
        out["grad"][out["nan"]] = math.inf
    elif kind == "overfit":  # val rises by `rise` loss scales over `over` while train keeps falling
        out["val_rise"] = float(p["rise"]) * scale * since / over
    else:
        raise ValueError(f"{run.name}: unknown pathology {kind!r}")


# ------------------------------------------------------------------------------------------------ the clock
class _Clock:
    """Stands in for the ``time`` module inside the exporter while a run is generated; ``now`` counts from the
    run's start, which is ``origin`` on the wall clock."""

    def __init__(self, origin: float = 0.0) -> None:
        self.origin = origin
        self.now = 0.0

    def time(self) -> float:
        return self.origin + self.now

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:  # sleep, monotonic, ...: the real module's
        import time
        return getattr(time, name)


@contextlib.contextmanager
def _simulated(clock: _Clock):
    from .. import collector, core, lifecycle
    modules = (core, collector, lifecycle)  # every training-side module that reads the wall clock
    saved = [m.time for m in modules]
    for m in modules:
        m.time = clock
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.time = original


def _exposition(registry) -> Dict[str, float]:
    """One scrape: every sample the registry serves, keyed ``name{labels}`` as the text exposition writes it."""
    from prometheus_client import generate_latest
    scraped = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            scraped[key if key.endswith("}") else key + "{}"] = float(value)
    return scraped


def scrape_series(run: Run, name: Optional[str] = None, pathology: bool = True, origin: float = 0.0) -> Series:
    """What Prometheus scrapes from the run's process(es): one value (or None, no sample) per scrape interval.

    Events: ``gap: [from, to]`` (Prometheus down: no samples), ``restart: at`` (the process dies and a new one
    resumes at the same global step a minute later), ``finish: at`` (closed as completed; the process exits at
    once, so later scrapes find the target down). ``origin``: the wall-clock time of the run's start, which the
    exporter's timestamp gauges count from (0 for promtool tests).
    """
    from prometheus_client import CollectorRegistry
    from ..core import TrainingExporter
    import torch
    torch.set_num_threads(1)
    if not pathology:
        run = Run(**{**run.__dict__, "pathology": None, "seed": run.seed + 1000})
    c = curves(run)
    n, scrapes = len(c["t"]), int(run.duration // run.scrape) + 1
    ev = run.events
    gap = [_seconds(x) for x in ev.get("gap", [])]
    restart = _seconds(ev["restart"]) if "restart" in ev else None
    finish = _seconds(ev["finish"]) if "finish" in ev else math.inf
    clock = _Clock(origin)
    rows: List[Optional[Dict[str, float]]] = []
    loss, grad, lr, t = c["loss"].tolist(), c["grad"].tolist(), c["lr"].tolist(), c["t"].tolist()
    val, accuracy = c["val"], c.get("accuracy")
    eval_rng = np.random.default_rng(run.seed + 1)
    # A recorded evaluation is real: it gets no noise added.
    eval_noise = 0.0 if run.recorded else float(run.loss.get("eval_noise", 0.005)) * float(c["scale"])
    frozen = run.onset if run.pathology is not None and run.pathology.get("frozen") else math.inf
    frozen_noise: Optional[float] = None
    with _simulated(clock):
        exp = TrainingExporter(run=name or run.name, port=0, addr="127.0.0.1", registry=CollectorRegistry())
        alive, next_eval, i = True, run.eval_interval, 0
        try:
            for k in range(scrapes):
                at = k * run.scrape  # promtool places the k-th value at k intervals
                while i < n and t[i] <= at and t[i] < finish:
                    clock.now = t[i]
                    if restart is not None and t[i] >= restart and alive:
                        exp.close("failed", stop_server=True)  # what a crash leaves: nothing more is served
                        alive = False
                    if not alive and t[i] >= restart + 60:
                        exp = TrainingExporter(run=name or run.name, port=0, addr="127.0.0.1",
                                               registry=CollectorRegistry())
                        alive, restart = True, None
                    if alive:
                        exp.log_step(loss[i], grad_norm=grad[i], lr=lr[i], step=i + 1, samples=32)
                        if t[i] + 1e-9 >= next_eval:
                            noise = frozen_noise if t[i] >= frozen and frozen_noise is not None else \
                                eval_rng.normal(0, eval_noise)
                            if t[i] >= frozen:
                                frozen_noise = noise
                            exp.log_eval("val", loss=float(val[i] + noise), step=i + 1,
                                         metrics=None if accuracy is None else {"accuracy": float(accuracy[i])})
                            next_eval += run.eval_interval
                    i += 1
                clock.now = at
                if at >= finish and alive:
                    exp.close("completed")
                    rows.append(_exposition(exp.registry))  # the last scrape before the process exits
                    alive = False
                    continue
                if gap and gap[0] <= at < gap[1]:
                    rows.append(None)
                elif not alive:
                    rows.append({})
                else:
                    rows.append(_exposition(exp.registry))
        finally:
            exp.close("completed" if alive else "failed", stop_server=True)
    keys = sorted({key for row in rows if row for key in row})
    series: Series = {key: [None if row is None else row.get(key) for row in rows] for key in keys}
    # `up` is Prometheus's own: 1 while the target answers, 0 when it does not, nothing while Prometheus is down.
    series["up{}"] = [None if row is None else float(bool(row)) for row in rows]
    return series


# ------------------------------------------------------------------------------------------ lifecycle rows
INSTANCE = "node-1:9945"
Targets = Dict[str, Series]  # what Prometheus scraped from each target (instance) of a lifecycle row


@dataclass
class _Process:
    """One training process of a lifecycle row, alive on ``instance`` from ``start`` until it ends ``how``."""

    instance: str
    run: str
    start: float
    first_step: float
    end: float = math.inf
    how: str = ""  # crash, preempt (scraped once more), preempt_unscraped, finish (scraped once more)
    exp: Any = None
    ended: bool = False  # its run ended (or it died): it makes no more steps
    gone: bool = False  # nothing answers on its port any more
    final_scrape: bool = False  # its end is served to one more scrape, then the process exits


def _processes(run: Run) -> List[_Process]:
    """The processes a lifecycle row's events describe (see ``lifecycle_series``)."""
    ev = run.events
    first = _Process(INSTANCE, run.name, 0.0, _seconds(ev.get("startup", 0)))
    for how in ("crash", "preempt", "preempt_unscraped", "finish"):
        if how in ev:
            first.end, first.how = _seconds(ev[how]), how
    out = [first]
    if "resume" in ev:
        r = ev["resume"]
        start = first.end + _seconds(r["after"])
        out.append(_Process(r.get("instance", INSTANCE), run.name, start, start + _seconds(r.get("startup", "2m"))))
    if "reuse" in ev:
        r = ev["reuse"]
        start = first.end + _seconds(r["after"])
        out.append(_Process(INSTANCE, r["run"], start, start + _seconds(r.get("startup", "1m"))))
    return out


@contextlib.contextmanager
def _sigterm_returns():
    """SIGTERM handled by a Python handler that returns (a scheduler tool's): the exporter's own handler, chained
    before it, publishes the interruption and the generator goes on."""
    import signal
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def lifecycle_series(run: Run, events: bool = True) -> Targets:
    """What Prometheus scrapes from every target of a lifecycle row: each process the real exporter on the
    simulated clock, a target answering ``{}`` (down) once its process is gone, nothing before its first.

    Events (times from the run's start): ``startup: 25m`` (the first step comes that long after the exporter
    started), ``checkpoint: [at, lasts]`` (no step for ``lasts``, inside ``exp.phase("checkpoint")``),
    ``crash: at`` (the process dies: nothing more is served), ``preempt: at`` (a real SIGTERM: the exporter
    publishes "interrupted", a scrape reads it, the process exits), ``preempt_unscraped: at`` (the process is
    killed before any scrape read it), ``finish: at`` (closed as completed, scraped once, exits),
    ``resume: {after, instance, startup}`` (the run comes back that long after its process ended, on
    ``instance``, at the global step it reached), ``reuse: {after, run}`` (another run starts on the dead
    process's node and port). ``events=False``: the same run without any (a healthy twin).
    """
    import signal
    from prometheus_client import CollectorRegistry
    from ..core import TrainingExporter
    import torch
    torch.set_num_threads(1)
    if not events:
        run = Run(**{**run.__dict__, "events": {}, "seed": run.seed + 1000})
    c = curves(run)
    loss, grad, lr, t = c["loss"].tolist(), c["grad"].tolist(), c["lr"].tolist(), c["t"].tolist()
    procs = _processes(run)
    gap = [_seconds(x) for x in run.events.get("gap", [])]
    moments: List[tuple] = [(p.start, 0, "start", p) for p in procs] + [(p.end, 3, "end", p) for p in procs]
    if "checkpoint" in run.events:
        at, lasts = (_seconds(x) for x in run.events["checkpoint"])
        moments += [(at, 1, "checkpoint", None), (at + lasts, 1, "checkpointed", None)]
    moments += [(x, 2, "step", i) for i, x in enumerate(t)]
    moments += [(k * run.scrape, 4, "scrape", k) for k in range(int(run.duration // run.scrape) + 1)]
    moments.sort(key=lambda m: (m[0], m[1]))
    clock = _Clock()
    rows: Dict[str, List[Optional[Dict[str, float]]]] = {p.instance: [] for p in procs}
    steps: Dict[str, int] = {}
    next_eval: Dict[int, float] = {}
    saving = None
    with _simulated(clock), _sigterm_returns():
        try:
            for when, _, kind, what in moments:
                if when > run.duration:
                    break
                clock.now = when
                live = [p for p in procs if p.exp is not None and not p.gone]
                if kind == "start":
                    what.exp = TrainingExporter(run=what.run, port=0, addr="127.0.0.1", registry=CollectorRegistry(),
                                                close_timeout=0, handle_sigterm=what.how.startswith("preempt"))
                    next_eval[id(what)] = what.first_step + run.eval_interval
                elif kind == "checkpoint":
                    saving = next(p for p in live if p.run == run.name).exp.phase("checkpoint")
                elif kind == "checkpointed":
                    saving.__exit__(None, None, None)
                    saving = None
                elif kind == "step":
                    for p in live:
                        if when < p.first_step or p.ended or (saving is not None and p.run == run.name):
                            continue
                        steps[p.run] = steps.get(p.run, 0) + 1
                        p.exp.log_step(loss[what], grad_norm=grad[what], lr=lr[what], step=steps[p.run], samples=32)
                        if when + 1e-9 >= next_eval[id(p)]:
                            p.exp.log_eval("val", loss=float(c["level"][what]) + 0.1 * float(c["scale"]),
                                           step=steps[p.run])
                            next_eval[id(p)] += run.eval_interval
                elif kind == "end" and what.exp is not None:
                    if what.how.startswith("preempt"):
                        signal.raise_signal(signal.SIGTERM)  # the exporter's handler, then the one that returns
                    elif what.how == "finish":
                        what.exp.close("completed")
                    what.ended, what.gone = True, what.how in ("crash", "preempt_unscraped")
                    what.final_scrape = not what.gone
                elif kind == "scrape":
                    down = bool(gap) and gap[0] <= when < gap[1]
                    for instance, scraped in rows.items():
                        here = [p for p in live if p.instance == instance]
                        if down:
                            scraped.append(None)
                        elif here:
                            scraped.append(_exposition(here[-1].exp.registry))
                            for p in here:
                                p.gone = p.gone or p.final_scrape  # the process exits once its end was read
                        else:
                            began = any(p.exp is not None for p in procs if p.instance == instance)
                            scraped.append({} if began else None)
        finally:
            for p in procs:
                if p.exp is not None:
                    p.exp.close("failed", stop_server=True)  # no scrape reads it any more
    out: Targets = {}
    for instance, scraped in rows.items():
        keys = sorted({key for row in scraped if row for key in row})
        out[instance] = {key: [None if row is None else row.get(key) for row in scraped] for key in keys}
        out[instance]["up{}"] = [None if row is None else float(bool(row)) for row in scraped]
    return out


# ------------------------------------------------------------------------------------------------ OpenMetrics
_KEY = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _om_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _om_number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


class OpenMetricsRun:
    """One run's scrapes as OpenMetrics samples, rendered once and written again under other labels.

    ``series`` comes from ``scrape_series``; the k-th value is stamped ``start + k * scrape`` (seconds, as
    ``promtool tsdb create-blocks-from openmetrics`` reads them) and a missing value writes no sample. The labels
    given to ``write`` are added to every series, replacing the exporter's own of that name (``rank``, ``run``).
    """

    def __init__(self, series: Series, scrape: float, start: float) -> None:
        self.families: Dict[str, List[Tuple[Dict[str, str], str]]] = {}
        stamps = [f"{start + k * scrape:.3f}" for k in range(max(map(len, series.values()), default=0))]
        for key, values in series.items():
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"not a scraped series key: {key!r}")
            samples = "\n".join(f"{_om_number(v)} {stamps[k]}" for k, v in enumerate(values) if v is not None)
            if samples:
                self.families.setdefault(m.group(1), []).append((dict(_PAIR.findall(m.group(2))), samples))

    def lines(self, family: str, labels: Mapping[str, str]) -> str:
        """The samples of one family under ``labels``, one line each, newline-terminated ('' if none)."""
        out, escaped = [], {k: _om_escape(v) for k, v in labels.items()}
        for own, samples in self.families.get(family, ()):
            pairs = ",".join(f'{k}="{v}"' for k, v in sorted({**own, **escaped}.items()))
            prefix = f"{family}{{{pairs}}} "
            # One replace in C instead of a Python loop per sample: 8,000 targets stay quick to write.
            out.append(prefix + samples.replace("\n", "\n" + prefix) + "\n")
        return "".join(out)


def write_openmetrics(out: TextIO, targets: Iterable[Tuple[OpenMetricsRun, Mapping[str, str]]]) -> int:
    """Write the scrapes of ``targets`` (a rendered run and the labels of one target) as one OpenMetrics text
    ending in ``# EOF``, each family's samples together as the format requires; returns the number of series.

    The exposition's ``# TYPE`` lines are left out: every series is backfilled as it was scraped, under its
    sample name (``_total``, ``_sum``, ``_count``), which is how Prometheus stores it.
    """
    targets = list(targets)
    names = sorted({name for run, _ in targets for name in run.families})
    count = 0
    for name in names:
        for run, labels in targets:
            count += len(run.families.get(name, ()))
            out.write(run.lines(name, labels))
    out.write("# EOF\n")
    return count


def openmetrics_text(run: Run, start: float, labels: Mapping[str, str]) -> str:
    """The OpenMetrics text of everything Prometheus scraped from ``run`` (and its twin, in the twin's
    namespace), the run starting at ``start`` on the wall clock, with ``labels`` on every series."""
    import io
    targets = [(OpenMetricsRun(scrape_series(run, origin=start), run.scrape, start),
                {"namespace": run.namespace, **labels})]
    if run.twin:
        targets.append((OpenMetricsRun(scrape_series(run, pathology=False, origin=start), run.scrape, start),
                        {**labels, "namespace": run.twin["namespace"]}))
    buf = io.StringIO()
    write_openmetrics(buf, targets)
    return buf.getvalue()
