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
from typing import Any, Dict, List, Mapping, Optional

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
                   namespace=d.get("namespace", "ns-a"), twin=d.get("twin"),
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
    """Stands in for the ``time`` module inside the exporter while a run is generated."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

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


def scrape_series(run: Run, name: Optional[str] = None, pathology: bool = True) -> Series:
    """What Prometheus scrapes from the run's process(es): one value (or None, no sample) per scrape interval.

    Events: ``gap: [from, to]`` (Prometheus down: no samples), ``restart: at`` (the process dies and a new one
    resumes at the same global step a minute later), ``finish: at`` (closed as completed; the process exits at
    once, so later scrapes find the target down).
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
    clock = _Clock()
    rows: List[Optional[Dict[str, float]]] = []
    loss, grad, lr, t = c["loss"].tolist(), c["grad"].tolist(), c["lr"].tolist(), c["t"].tolist()
    val, accuracy = c["val"], c.get("accuracy")
    eval_rng = np.random.default_rng(run.seed + 1)
    # A recorded evaluation is real: it gets no noise added.
    eval_noise = 0.0 if run.recorded else float(run.loss.get("eval_noise", 0.005)) * float(c["scale"])
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
                            exp.log_eval("val", loss=float(val[i] + eval_rng.normal(0, eval_noise)), step=i + 1,
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
