"""The metric definitions: the one place that names what the exporter serves.

The collector builds its families from these definitions; the recording rules, the dashboards and the docs are
checked against them by the tests. Every series also carries the labels in ``BASE_LABELS``.
"""
from __future__ import annotations

from dataclasses import dataclass

BASE_LABELS = ("run", "rank")

# Values of the labels of the exporter's own health counters; they exist at 0 from the start.
ERROR_SITES = ("hook", "reader", "collect", "log")
DROP_KINDS = ("config", "eval", "layer", "phase")
RUN_STATUSES = ("running", "completed", "failed", "interrupted")
# training_eval_loss_noise comes from each split's last EVAL_NOISE_HISTORY finite evaluations. It is published
# once EVAL_NOISE_MIN of them show noise rather than a bend of the curve: the estimate from first differences is
# at most EVAL_NOISE_BEND times the one from second differences. On noise alone both estimate the same deviation
# (the ratio exceeds 1.5 by chance at 5 evaluations 11% of the time, at 8 2%, at 16 0.04%: publication then
# waits an evaluation or two); a curve that bends between far-apart evaluations inflates the first far more.
EVAL_NOISE_HISTORY = 16
EVAL_NOISE_MIN = 5
EVAL_NOISE_BEND = 1.5


@dataclass(frozen=True)
class Metric:
    """One metric family: its exposed name, type, help text and labels beyond ``run`` and ``rank``."""

    name: str
    type: str  # "gauge", "counter" or "summary"
    help: str
    labels: tuple[str, ...] = ()

    @property
    def samples(self) -> tuple[str, ...]:
        """Names of the samples the family exposes, as PromQL sees them."""
        if self.type == "summary":
            return (self.name + "_sum", self.name + "_count")
        return (self.name,)


_DEFS = [
    # The contract's series.
    Metric("training_step", "gauge", "Optimizer steps completed (global step, resumes with the job)."),
    Metric("training_epoch", "gauge", "Current epoch."),
    Metric("training_last_step_timestamp_seconds", "gauge", "Unix time of the last completed step."),
    Metric("training_loss", "gauge", "Latest loss: train at every step, other splits at each evaluation.",
           ("split",)),
    Metric("training_learning_rate", "gauge", "Learning rate of each optimizer param group; param_group is the "
           "group's index, continuing across watched optimizers in the order of watch() (a group added later takes "
           "the next index).", ("param_group",)),
    Metric("training_grad_norm", "gauge", "Global L2 norm of the gradients at the last step, before clipping "
           "where known."),
    Metric("training_eval_metric", "gauge", "Task metrics reported with each evaluation.", ("split", "metric")),
    # Run metadata and lifecycle.
    Metric("training_run_info", "gauge", "Run metadata and bounded, sanitised config as labels; value 1.",
           ("world_size", "local_rank", "host", "version")),
    Metric("training_run_status", "gauge", "1 for the run's current status, 0 for the others.", ("status",)),
    Metric("training_run_start_timestamp_seconds", "gauge", "Unix time the exporter of this process started."),
    # Per-step aggregates: what happens between two scrapes is not lost to sampling.
    Metric("training_step_loss", "summary", "Finite train losses of every step (sum and count). The sum falls "
           "with negative losses: means between scrapes come from the sign-split counters."),
    Metric("training_loss_steps_total", "counter", "Optimizer steps whose train loss was finite (micro-batch "
           "losses folded into their optimizer step)."),
    Metric("training_loss_positive_sum_total", "counter", "Sum of max(loss, 0) over the steps of "
           "training_loss_steps_total; mean loss = (increase(positive) - increase(negative)) / increase(steps)."),
    Metric("training_loss_negative_sum_total", "counter", "Sum of max(-loss, 0) over the steps of "
           "training_loss_steps_total."),
    Metric("training_loss_squared_sum_total", "counter", "Sum of loss squared over the steps of "
           "training_loss_steps_total, for the run's own noise level."),
    Metric("training_grad_norm_steps_total", "counter", "Optimizer steps with a finite global gradient norm."),
    Metric("training_grad_norm_sum_total", "counter", "Sum of the finite global gradient norms of those steps: "
           "exact mean norm between scrapes."),
    Metric("training_last_nonfinite_timestamp_seconds", "gauge", "Unix time of the last step with a NaN or "
           "infinite train loss or genuinely non-finite gradients (not a scaler's skip); absent until one happens."),
    Metric("training_loss_recent_max", "gauge", "Largest finite train loss of the steps in the recent window "
           "(max_window seconds), so that a one-step spike outlives the next scrape."),
    Metric("training_grad_norm_recent_max", "gauge", "Largest finite global gradient norm of the steps in the "
           "recent window (max_window seconds)."),
    Metric("training_loss_nonfinite_total", "counter", "Steps whose train loss was NaN or infinite."),
    Metric("training_grad_nonfinite_total", "counter", "Optimizer steps taken with NaN or infinite gradients."),
    Metric("training_scaler_skipped_steps_total", "counter", "Steps whose optimizer update was skipped, as a "
           "gradient scaler does when it finds infinite gradients."),
    Metric("training_samples_total", "counter", "Training samples processed."),
    Metric("training_step_duration_seconds", "summary", "Wall time between consecutive completed steps of this "
           "process."),
    Metric("training_eval_step", "gauge", "Global step of the latest evaluation of each split.", ("split",)),
    Metric("training_eval_timestamp_seconds", "gauge", "Unix time of the latest evaluation of each split.",
           ("split",)),
    Metric("training_evals_total", "counter", "Evaluations logged per split.", ("split",)),
    Metric("training_eval_loss_best", "gauge", "Lowest finite eval loss of each split so far in this process.",
           ("split",)),
    Metric("training_evals_since_best", "gauge", "Evaluations with a loss since this process's best one of each "
           "split (0 at the best).", ("split",)),
    Metric("training_eval_loss_noise", "gauge", "Noise of each split's eval loss: the standard deviation of one "
           "evaluation around its curve, from the spread of the successive differences of its last "
           f"{EVAL_NOISE_HISTORY} finite evaluations (a steady trend is left out); absent until "
           f"{EVAL_NOISE_MIN} of them vary more by noise than by the bend of the curve.", ("split",)),
    # Gradient detail.
    Metric("training_grad_norm_shard_squared", "gauge", "This rank's share of the squared global gradient norm at "
           "the last step, when gradients are sharded (FSDP2 DTensors); the ranks' values sum to the global "
           "norm squared (recording rule run:training_grad_norm:global). Absent without sharded gradients."),
    Metric("training_grad_mean", "gauge", "Mean over parameters of each gradient's mean (sampled every "
           "detail_every optimizer steps)."),
    Metric("training_layer_grad_norm", "gauge", "L2 norm of the gradients of each layer group at the last step.",
           ("layer",)),
    # The exporter's own health.
    Metric("training_exporter_errors_total", "counter", "Faults inside the exporter, caught before they reached "
           "training.", ("where",)),
    Metric("training_exporter_dropped_total", "counter", "Items dropped to bound label cardinality.", ("kind",)),
    # Lifecycle: each phase has its own allowance before the rules call a run hung.
    Metric("training_phase_start_timestamp_seconds", "gauge", "Unix time the current phase began (startup until "
           "the first step, then train, or what exp.phase() marks: eval, checkpoint, ...); one series, labelled "
           "with the current phase.", ("phase",)),
    Metric("training_last_progress_timestamp_seconds", "gauge", "Unix time of the latest sign of progress: a step, "
           "an evaluation, or the start of the current phase (so the exporter's start before the first step)."),
]

METRICS: dict[str, Metric] = {m.name: m for m in _DEFS}


def sample_names() -> set[str]:
    """Every sample name the exporter can expose, for checks of rules, dashboards and docs."""
    return {s for m in _DEFS for s in m.samples}
