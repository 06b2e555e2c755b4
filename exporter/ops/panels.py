"""The panels of the dashboards, as data: one source for the Grafana dashboards and the PNG report.

Queries read the recording rules (``deploy/prometheus/rules``) where one exists, so dashboards, alerts and the
report agree on what "smoothed" or "slope" means, and every line an alert compares with is drawn from the same
thresholds file. Runs are told apart by the thresholds file's identity labels, each a dashboard variable
(``$cluster``, ``$namespace``, ``$job``, ``$run``); ``$rank``, ``$metric`` and Grafana's ``$__range``,
``$__interval``, ``$__rate_interval`` are the others. ``fill`` puts values in for the report and the tests.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from .links import base_url
from .rules import SEVERITY
from .thresholds import Thresholds


@dataclass(frozen=True)
class Query:
    """One query of a panel. ``style``: "line"; "threshold", a line an alert compares with (dashed); "right", a
    series with its own unit (``PanelSpec.right_unit``) on a second axis; "bars", counts per interval."""

    expr: str
    legend: str
    style: str = "line"


@dataclass(frozen=True)
class Level:
    """A constant an alert compares with (a dashed line), or on a stat panel the value from which it turns red."""

    value: float
    label: str


@dataclass(frozen=True)
class PanelSpec:
    """A panel: title, what it shows, its queries and how to draw them.

    ``kind``: "timeseries" (against time); "by_step" (against the optimizer step, so runs overlay however far
    apart they started; one query, one line per run); "stat" (the latest value in the time range, per run);
    "alerts" (the firing alerts, linked to their runbook sections).
    """

    title: str
    description: str
    queries: Tuple[Query, ...]
    unit: str = "none"
    kind: str = "timeseries"
    levels: Tuple[Level, ...] = ()
    zero_line: bool = False  # the seed draws y=0 on the gap and slope plots
    log_scale: bool = False
    right_unit: Optional[str] = None
    text_mode: Optional[str] = None  # stat panels: "name" shows the series name (a status) instead of a number
    repeat: Optional[str] = None  # a dashboard variable to repeat the panel by
    width: int = 12
    in_report: bool = True


@dataclass(frozen=True)
class Row:
    """A row of the dashboard: one of the seed's diagnoses, or the run's header."""

    title: str
    panels: Tuple[PanelSpec, ...]


class Selectors:
    """The label matchers and the grouping of one run, from the thresholds file's identity labels."""

    def __init__(self, t: Thresholds) -> None:
        self.labels = [label.strip() for label in t.identity.split(",")]
        self.by = t.identity
        self.run = ", ".join(f'{label}=~"${label}"' for label in self.labels)
        self.rank = self.run + ', rank=~"$rank"'
        self.scope = ", ".join(f'{label}=~"${label}"' for label in self.labels if label != "run")


def run_status(by: str, sel: str) -> str:
    """The last status each run reported in the time range; "lost" for a run that said it was running and is no
    longer scraped (a crash, a killed pod). One series per run, the status in its ``status`` label."""
    last = f"last_over_time(training_run_status{{{sel}}}[$__range])"
    said_running = "last_over_time(training_run_status{" + sel + ', status="running"}[$__range])'
    scraped = f"max by ({by}) (training_run_status{{{sel}}})"
    # An empty source label and regex: label_replace sets status="lost" on every series it is given.
    return (f'label_replace(max by ({by}) ({said_running} == 1) unless on ({by}) {scraped}, "status", "lost", "", "")'
            f" or on ({by}) max by ({by}, status) ({last} == 1)")


def runbook_labels(expr: str, runbook: str) -> str:
    """``expr`` (ALERTS series) with a ``runbook`` label: the runbook section of each alert of the shipped rules."""
    for name in SEVERITY:
        expr = f'label_replace({expr}, "runbook", "{runbook}#alert-name-{name.lower()}", "alertname", "{name}")'
    return expr


def event_queries(t: Thresholds, sel: Optional[str] = None) -> Dict[str, str]:
    """Queries that several panels and annotations share: the best eval loss, evaluations and non-finite steps.
    ``sel``: the label matchers (default: the selected runs)."""
    s = Selectors(t)
    by, sel = s.by, sel if sel is not None else s.run
    split = t.text("eval_split")
    return {
        # The exporter's own best: exact even when two evaluations fall between scrapes.
        "best_eval_loss": f"min by ({by}) (last_over_time("
                          f'training_eval_loss_best{{{sel}, split="{split}"}}[$__range]))',
        # Counts every evaluation, also two in one scrape interval.
        "evaluations": f"max by ({by}, split) (increase(training_evals_total{{{sel}}}[1m]) > 0)",
        # The moment of the last non-finite step, also one that happened while Prometheus was away.
        "nonfinite": f"max by ({by}) (changes(training_last_nonfinite_timestamp_seconds{{{sel}}}[1m]) > 0)",
    }


def run_panels(t: Thresholds) -> Tuple[Row, ...]:
    """The "Training run" dashboard's rows and panels, with the alerts' thresholds from ``t``."""
    s = Selectors(t)
    sel, rank, by = s.run, s.rank, s.by
    a = "alerts."
    split = t.text("eval_split")
    ls, ge = a + "TrainingLossSpike.", a + "TrainingGradientExplosion."
    spike, explosion = t.number(ls + "sigmas"), t.number(ge + "factor")
    diverging = t.number(a + "TrainingDiverging.rise_sigmas")
    plateau = t.number(a + "TrainingPlateau.improvement_sigmas")
    slow = t.number(a + "TrainingLossDecreasingSlowly.improvement_sigmas")
    trend = t.duration("windows.trend")
    extra = event_queries(t)
    train = Query(f"run:training_loss:smoothed{{{sel}}}", "{{run}}")

    def latest(expr: str) -> str:
        return f"max by ({by}) (last_over_time({expr}[$__range]))"

    header = Row("Run", (
        PanelSpec("Status", "Last status the run reported in the time range; lost: it said running and is no longer "
                  "scraped (crashed or killed).",
                  (Query(run_status(by, sel), "{{run}}: {{status}}"),), kind="stat", text_mode="name", width=4),
        PanelSpec("Step", "Global optimizer step.", (Query(latest(f"training_step{{{rank}}}"), "{{run}}"),),
                  kind="stat", width=2),
        PanelSpec("Epoch", "Current epoch.", (Query(latest(f"training_epoch{{{rank}}}"), "{{run}}"),),
                  kind="stat", width=2),
        PanelSpec("Since last step", "Time since the last completed step, at the end of the time range; red from "
                  "the hung alert's shortest allowance (its floor) on.",
                  (Query(f"time() - {latest(f'training_last_step_timestamp_seconds{{{rank}}}')}", "{{run}}"),),
                  unit="s", kind="stat", levels=(Level(t.seconds(a + "TrainingHung.floor"), "hung floor"),), width=3),
        PanelSpec("Train loss", "Latest train loss (one step, not smoothed).",
                  (Query(f'avg by ({by}) (last_over_time(training_loss{{{rank}, split="train"}}[$__range]))',
                         "{{run}}"),), kind="stat", width=3),
        PanelSpec(f"{split.capitalize()} loss", f"Latest {split} loss.",
                  (Query(latest(f'run:training_eval_loss:latest{{{sel}, split="{split}"}}'), "{{run}}"),),
                  kind="stat", width=3),
        PanelSpec(f"Best {split} loss", f"Lowest {split} loss in the time range.",
                  (Query(extra["best_eval_loss"], "{{run}}"),), kind="stat", width=3),
        PanelSpec("Current learning rate", "Latest learning rate (largest over param groups).",
                  (Query(latest(f"training_learning_rate{{{rank}}}"), "{{run}}"),), unit="sci", kind="stat",
                  width=4),
        PanelSpec("Firing alerts", "Training alerts firing now, each linked to its runbook section (the seed's "
                  "remedies).",
                  (Query(runbook_labels(f'ALERTS{{alertstate="firing", {sel}}}', base_url(t, "links.runbook_url")), ""),),
                  kind="alerts", width=24),
    ))
    by_step = Row("Loss by step", (
        PanelSpec("Train loss by step", "Smoothed train loss against the optimizer step: runs overlay by step "
                  "however far apart they started, as in W&B or TensorBoard. Each run keeps its colour (by name) "
                  "on every panel.", (train,), kind="by_step"),
        PanelSpec(f"{split.capitalize()} loss by step", f"Each {split} evaluation's loss against the step.",
                  (Query(f'run:training_eval_loss:latest{{{sel}, split="{split}"}}', "{{run}}"),), kind="by_step"),
    ))
    overfitting = Row("Overfitting", (
        PanelSpec("Learning curves", "Smoothed train loss (exact mean of every step) and the latest evaluation "
                  "loss of each split. Train and val both falling: healthy; val rising while train falls: "
                  "overfitting; train rising: learning rate too high or a bug.",
                  (train, Query(f"run:training_eval_loss:latest{{{sel}}}", "{{run}} {{split}}"))),
        PanelSpec("Generalization gap", f"Latest {split} loss minus the smoothed train loss. Growing steadily above "
                  "zero: overfitting.",
                  (Query(f"run:training_generalization_gap:current{{{sel}}}", "{{run}}"),), zero_line=True),
        PanelSpec(f"{split.capitalize()} rise over its best", f"How far the latest {split} loss stands above the "
                  "lowest so far, and the margin the overfitting alert needs it to clear: a multiple of the "
                  "evaluations' own noise once the exporter has measured it, else of the train step noise.",
                  (Query(f'run:training_eval_loss:latest{{{sel}, split="{split}"}} - '
                         f'run:training_eval_loss:best{{{sel}, split="{split}"}}', "{{run}}"),
                   Query(f"run:training_eval_loss:rise_margin{{{sel}}}", "{{run}} margin", "threshold"))),
    ))
    instability = Row("Instability", (
        PanelSpec("Loss spikes", "The train loss of the last step at each scrape, the largest loss of any step "
                  "in the exporter's window (a one-step spike between two scrapes shows here), and the spike "
                  f"alert's threshold: the smoothed loss plus {spike:g} deviations of the run's step noise.",
                  (Query(f'avg by ({by}) (training_loss{{{rank}, split="train"}})', "{{run}}"),
                   Query(f"max by ({by}) (training_loss_recent_max{{{rank}}})", "{{run}} windowed max"),
                   Query(f"run:training_loss:smoothed{{{sel}}} + {spike:g} * run:training_loss:noise{{{sel}}}",
                         "{{run}} spike threshold", "threshold"))),
        PanelSpec("Spike size", "How many deviations of the run's step noise the windowed maximum stands above the "
                  f"smoothed loss; the spike alert fires above {spike:g}.",
                  (Query(f"run:training_loss:spike_sigmas{{{sel}}}", "{{run}}"),),
                  levels=(Level(spike, "TrainingLossSpike"),)),
        PanelSpec("Gradient norm", "Global L2 norm of the gradients before clipping: mean over the explosion "
                  "window, largest single step, and the explosion alert's threshold "
                  f"({explosion:g}x the run's mean norm over the baseline window).",
                  (Query(f"run:training_grad_norm:smoothed{{{sel}}}", "{{run}}"),
                   Query(f"max by ({by}) (training_grad_norm_recent_max{{{rank}}})", "{{run}} largest step"),
                   Query(f"{explosion:g} * run:training_grad_norm:baseline{{{sel}}}", "{{run}} explosion threshold",
                         "threshold")), log_scale=True),
        PanelSpec("Loss change per step", "Change of the smoothed train loss per optimizer step over the "
                  "smoothing window: frequent large swings mean unstable training.",
                  (Query(f"run:training_loss:change_per_step{{{sel}}}", "{{run}}"),), zero_line=True),
        PanelSpec("Non-finite steps", "Steps with a NaN/Inf loss or gradients in each interval (exact counts, "
                  "from the counters), and steps a gradient scaler skipped (occasional skips are normal with "
                  "mixed precision).",
                  tuple(Query(f"sum by ({by}) (clamp_min({m}{{{rank}}} - {m}{{{rank}}} offset $__interval, 0))",
                              "{{run}} " + label, "bars")
                        for m, label in (("training_loss_nonfinite_total", "non-finite loss"),
                                         ("training_grad_nonfinite_total", "non-finite gradients"),
                                         ("training_scaler_skipped_steps_total", "scaler skipped"))),
                  width=24),
    ))
    convergence = Row("Convergence", (
        PanelSpec("Moving averages", f"Smoothed train loss and the {split} loss averaged over the trend window "
                  f"({trend}). Both flat: converged or stuck.",
                  (train, Query(f'avg_over_time(run:training_eval_loss:latest{{{sel}, split="{split}"}}[{trend}])',
                                "{{run}} " + split))),
        PanelSpec("Learning rate", "Learning rate of each optimizer param group.",
                  (Query(f"max by ({by}, param_group) (training_learning_rate{{{rank}}})",
                         "{{run}} group {{param_group}}"),), unit="sci", log_scale=True),
        PanelSpec("Rise above the best", "How many deviations of the run's step noise the smoothed train loss "
                  f"stands above its best of the lookback. The divergence alert fires above {diverging:g} while the "
                  "loss still rises.",
                  (Query(f"run:training_loss:rise_sigmas{{{sel}}}", "{{run}}"),),
                  levels=(Level(diverging, "TrainingDiverging"),), zero_line=True),
        PanelSpec("Improvement per window", "How many deviations of the run's step noise the best smoothed train "
                  "loss improved by over the plateau window. Below the plateau line: converged or stuck; below the "
                  "slow-progress line for hours: the learning rate may be too low.",
                  (Query(f"run:training_loss:improvement_sigmas{{{sel}}}", "{{run}}"),),
                  levels=(Level(plateau, "TrainingPlateau"), Level(slow, "TrainingLossDecreasingSlowly"))),
    ))
    system = Row("Throughput and steps", (
        PanelSpec("Throughput", "Training samples per second (left axis) and optimizer steps per second (right).",
                  (Query(f"run:training_samples:rate{{{sel}}}", "{{run}} samples/s"),
                   Query(f"run:training_steps:rate{{{sel}}}", "{{run}} steps/s", "right")),
                  unit="suffix: samples/s", right_unit="suffix: steps/s"),
        PanelSpec("Step time per rank", "Mean wall time per step of each rank: a straggler stands out.",
                  (Query(f"run_rank:training_step_duration_seconds:mean{{{rank}}}", "{{run}} rank {{rank}}"),),
                  unit="s"),
        PanelSpec("Global step", "Global optimizer step: flat while the job runs means it is hung.",
                  (Query(f"max by ({by}) (training_step{{{rank}}})", "{{run}}"),)),
        PanelSpec("Gradient norm per layer", "Gradient L2 norm of each layer group: which layers explode or vanish.",
                  (Query(f"max by ({by}, layer) (training_layer_grad_norm{{{rank}}})", "{{run}} {{layer}}"),),
                  log_scale=True),
    ))
    # Last, so that repeating it per metric moves no other panel.
    tasks = Row("Task metrics", (
        PanelSpec("Task metric $metric", "Task metrics reported with each evaluation, one panel per metric.",
                  (Query(f'max by ({by}, split) (training_eval_metric{{{rank}, metric="$metric"}})',
                         "{{run}} {{split}}"),), repeat="metric", in_report=False),
    ))
    return (header, by_step, overfitting, instability, convergence, system, tasks)


def annotations(t: Thresholds) -> Tuple[Tuple[str, str, str, str], ...]:
    """The run dashboard's annotations: (name, query, colour, title format)."""
    s = Selectors(t)
    extra = event_queries(t)
    colour = {"critical": "red", "warning": "orange", "info": "blue"}
    alerts = tuple((f"Alerts: {sev}", f'ALERTS{{alertstate="firing", severity="{sev}", {s.run}}}', colour[sev],
                    "{{alertname}}") for sev in colour)
    return alerts + (
        ("Evaluations", extra["evaluations"], "green", "{{split}} evaluation"),
        ("Epochs", f"max by ({s.by}) (changes(training_epoch{{{s.run}}}[1m]) > 0)", "purple", "new epoch"),
        ("Restarts and resumes", f"max by ({s.by}) (changes(training_run_start_timestamp_seconds{{{s.run}}}[1m]) > 0)",
         "yellow", "process restarted"),
        ("Non-finite steps", extra["nonfinite"], "dark-red", "non-finite loss"),
    )


def step_by_run(t: Thresholds) -> str:
    """The step of each run at each instant: the x of the by-step panels."""
    return f"max by (run) (training_step{{{Selectors(t).rank}}})"


def all_panels(t: Thresholds) -> Tuple[PanelSpec, ...]:
    return tuple(p for row in run_panels(t) for p in row.panels)


_VARIABLE = re.compile(r"\$(\w+)")


def fill(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with each ``$name`` replaced by ``values[name]``; names not given stay."""
    return _VARIABLE.sub(lambda m: values.get(m.group(1), m.group(0)), expr)


def regex_literal(text: str) -> str:
    """``text`` as a Prometheus regular expression matching only itself, quoted for a PromQL string."""
    escaped = re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)
    return escaped.replace("\\", "\\\\").replace('"', '\\"')
