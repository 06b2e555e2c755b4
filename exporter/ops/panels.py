"""The panels of the dashboards, as data: one source for the Grafana dashboards and the PNG report.

Queries read the recording rules (``deploy/prometheus/rules``) where one exists, so dashboards, alerts and the
report agree on what "smoothed" or "slope" means. ``$job``, ``$run``, ``$rank`` and ``$metric`` are dashboard
variables; the report fills them in itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

SEL = 'job=~"$job", run=~"$run"'
SEL_RANK = 'job=~"$job", run=~"$run", rank=~"$rank"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    """A time-series panel: title, what it shows, its queries and how to draw them."""

    title: str
    description: str
    queries: Tuple[Query, ...]
    unit: str = "short"
    zero_line: bool = False  # the seed draws y=0 on the gap and slope plots
    log_scale: bool = False
    repeat: Optional[str] = None  # a dashboard variable to repeat the panel by
    in_report: bool = True


def run_panels(explosion_factor: float) -> Tuple[PanelSpec, ...]:
    """The "Training run" dashboard's panels; ``explosion_factor`` draws the explosion alert's threshold."""
    return (
        PanelSpec("Learning curves", "Smoothed train loss (exact mean of every step) and the latest evaluation "
                  "loss of each split. Train and val both falling: healthy; val rising while train falls: "
                  "overfitting; train rising: learning rate too high or a bug.",
                  (Query(f"run:training_loss:smoothed{{{SEL}}}", "{{run}} train"),
                   Query(f"run:training_eval_loss:latest{{{SEL}}}", "{{run}} {{split}}"))),
        PanelSpec("Generalization gap", "Latest val loss minus the smoothed train loss. Growing steadily above "
                  "zero: overfitting.",
                  (Query(f"run:training_generalization_gap:current{{{SEL}}}", "{{run}} val - train"),),
                  zero_line=True),
        PanelSpec("Learning rate", "Learning rate of each optimizer param group.",
                  (Query(f"max by (run, param_group) (training_learning_rate{{{SEL_RANK}}})",
                         "{{run}} group {{param_group}}"),), log_scale=True),
        PanelSpec("Gradient norm", "Global L2 norm of the gradients before clipping: median over the "
                  "explosion window, largest single step, and the explosion alert's threshold.",
                  (Query(f"run:training_grad_norm:smoothed{{{SEL}}}", "{{run}} median"),
                   Query(f"max by (run) (training_grad_norm_recent_max{{{SEL_RANK}}})", "{{run}} largest step"),
                   Query(f"{explosion_factor:g} * run:training_grad_norm:baseline{{{SEL}}}",
                         "{{run}} explosion threshold")), log_scale=True),
        PanelSpec("Loss change per step", "Change of the smoothed train loss per optimizer step over the "
                  "smoothing window: frequent large swings mean unstable training.",
                  (Query(f"run:training_loss:change_per_step{{{SEL}}}", "{{run}}"),), zero_line=True),
        PanelSpec("Moving-average slope", "Slope of the smoothed train loss per step over the trend window. "
                  "About zero: converged or stuck; above zero: learning rate too high; below zero but tiny: "
                  "learning rate too low.",
                  (Query(f"run:training_loss:slope{{{SEL}}}", "{{run}}"),), zero_line=True),
        PanelSpec("Task metric $metric", "Task metrics reported with each evaluation, one panel per metric.",
                  (Query(f'max by (run, split) (training_eval_metric{{{SEL}, metric="$metric"}})',
                         "{{run}} {{split}}"),), repeat="metric", in_report=False),
        PanelSpec("Throughput", "Training samples and optimizer steps per second.",
                  (Query(f"run:training_samples:rate{{{SEL}}}", "{{run}} samples/s"),
                   Query(f"run:training_steps:rate{{{SEL}}}", "{{run}} steps/s"))),
        PanelSpec("Step time per rank", "Mean wall time per step of each rank: a straggler stands out.",
                  (Query(f"run_rank:training_step_duration_seconds:mean{{{SEL_RANK}}}", "{{run}} rank {{rank}}"),),
                  unit="s"),
        PanelSpec("Non-finite steps", "Steps with a NaN/Inf loss or gradients, and steps a gradient scaler "
                  "skipped (occasional skips are normal with mixed precision).",
                  (Query(f"sum by (run) (increase(training_loss_nonfinite_total{{{SEL_RANK}}}[$__rate_interval]))",
                         "{{run}} non-finite loss"),
                   Query(f"sum by (run) (increase(training_grad_nonfinite_total{{{SEL_RANK}}}[$__rate_interval]))",
                         "{{run}} non-finite gradients"),
                   Query(f"sum by (run) (increase(training_scaler_skipped_steps_total{{{SEL_RANK}}}"
                         f"[$__rate_interval]))", "{{run}} scaler skipped"))),
        PanelSpec("Step", "Global optimizer step: flat while the job runs means it is hung.",
                  (Query(f"max by (run) (training_step{{{SEL_RANK}}})", "{{run}}"),)),
        PanelSpec("Gradient norm per layer", "Gradient L2 norm of each layer group: which layers explode or vanish.",
                  (Query(f"max by (run, layer) (training_layer_grad_norm{{{SEL_RANK}}})", "{{run}} {{layer}}"),),
                  log_scale=True),
    )
