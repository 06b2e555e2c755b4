"""The loss and gradient diagnoses of the seed: recording rules and alerts (non-finite, explosion, spike,
divergence, overfitting, plateau, slow progress)."""
from __future__ import annotations

from typing import Dict, List

from .rules import Alert, num, pct, seconds
from .thresholds import Thresholds


def recording(t: Thresholds) -> Dict[str, str]:
    """Series shared by dashboards and alerts, one per run unless the name says ``run_rank``."""
    s, ids = t.text("selector"), t.identity
    smooth, trend, baseline = t.duration("windows.smoothing"), t.duration("windows.trend"), t.duration("windows.baseline")
    split = t.text("eval_split")
    explosion_window = t.duration("alerts.TrainingGradientExplosion.window")
    return {
        # Exact mean of every step's train loss over the smoothing window, over all ranks.
        "run:training_loss:smoothed": f"""
            sum by ({ids}) (increase(training_step_loss_sum{{{s}}}[{smooth}]))
              /
            sum by ({ids}) (increase(training_step_loss_count{{{s}}}[{smooth}]))""",
        # Steps made over the trend window; from the per-process step counter, so a resumed job whose global
        # step jumps does not fake a flat slope.
        "run:training_step:advance": f"""
            max by ({ids}) (increase(training_step_duration_seconds_count{{{s}}}[{trend}]))""",
        # The seed's moving-average slope, per step: loss units per optimizer step over the trend window.
        "run:training_loss:slope": f"""
            (run:training_loss:smoothed - run:training_loss:smoothed offset {trend})
              /
            (run:training_step:advance > 0)""",
        # The slope relative to the loss level: 1e-4 means +10% per 1000 steps, whatever the loss's scale.
        "run:training_loss:relative_slope": f"""
            run:training_loss:slope / run:training_loss:smoothed offset {trend}""",
        # Relative improvement per step of the best smoothed loss: the lowest value of the last trend window
        # against the lowest of the window before. Minima of a noisy mean move less than the mean itself, so
        # this reads "stopped improving" more reliably than the slope does.
        "run:training_loss:improvement": f"""
            (
              min_over_time(run:training_loss:smoothed[{trend}] offset {trend})
              - min_over_time(run:training_loss:smoothed[{trend}])
            )
            / min_over_time(run:training_loss:smoothed[{trend}] offset {trend})
            / (run:training_step:advance > 0)""",
        # Loss change per step over the smoothing window (the seed's third instability plot).
        "run:training_loss:change_per_step": f"""
            (run:training_loss:smoothed - run:training_loss:smoothed offset {smooth})
              /
            (max by ({ids}) (increase(training_step_duration_seconds_count{{{s}}}[{smooth}])) > 0)""",
        "run:training_eval_loss:latest": f"""
            avg by ({ids}, split) (training_loss{{{s}, split!="train"}})""",
        # The seed's generalization gap: latest eval loss minus the smoothed train loss.
        "run:training_generalization_gap:current": f"""
            run:training_eval_loss:latest{{split="{split}"}} - ignoring (split) run:training_loss:smoothed""",
        "run:training_generalization_gap:trend": f"""
            run:training_generalization_gap:current - run:training_generalization_gap:current offset {trend}""",
        # Medians: robust to single noisy steps.
        "run:training_grad_norm:smoothed": f"""
            max by ({ids}) (quantile_over_time(0.5, training_grad_norm{{{s}}}[{explosion_window}]))""",
        "run:training_grad_norm:baseline": f"""
            max by ({ids}) (quantile_over_time(0.5, training_grad_norm{{{s}}}[{baseline}]))""",
        # The usual windowed loss maximum: small-batch noise sets it, so spikes are judged against the run's own
        # noise.
        "run:training_loss_recent_max:baseline": f"""
            max by ({ids}) (quantile_over_time(0.5, training_loss_recent_max{{{s}}}[{baseline}]))""",
        # How far the latest windowed maximum stands above that usual level: the loss-spike signal.
        "run:training_loss:spike_ratio": f"""
            max by ({ids}) (training_loss_recent_max{{{s}}}) / run:training_loss_recent_max:baseline""",
        "run:training_samples:rate": f"""
            sum by ({ids}) (rate(training_samples_total{{{s}}}[{smooth}]))""",
        "run:training_steps:rate": f"""
            max by ({ids}) (rate(training_step_duration_seconds_count{{{s}}}[{smooth}]))""",
        # Per-rank step time: a straggler shows here.
        "run_rank:training_step_duration_seconds:mean": f"""
            sum by ({ids}, rank) (rate(training_step_duration_seconds_sum{{{s}}}[{smooth}]))
              /
            sum by ({ids}, rank) (rate(training_step_duration_seconds_count{{{s}}}[{smooth}]))""",
        # The global gradient norm of a job with sharded gradients (FSDP2), from each rank's share of the squared
        # norm: the exporter starts no collective. Ranks are sampled at their own last step.
        "run:training_grad_norm:global": f"""
            sqrt(sum by ({ids}) (training_grad_norm_shard_squared{{{s}}}))""",
    }


def alerts(t: Thresholds) -> List[Alert]:
    """The loss and gradient alerts."""
    ids = t.identity
    s = t.text("selector")
    trend, lookback = t.duration("windows.trend"), t.duration("windows.lookback")
    split = t.text("eval_split")
    a = "alerts."
    nf, ge, ls = a + "TrainingLossNotFinite.", a + "TrainingGradientExplosion.", a + "TrainingLossSpike."
    dv, of, pl = a + "TrainingDiverging.", a + "TrainingOverfitting.", a + "TrainingPlateau."
    sl = a + "TrainingLossDecreasingSlowly."
    nf_window = t.duration(nf + "window")
    plateau_slope = t.number(pl + "relative_improvement")
    old_enough = f"""(time() - min by ({ids}) (training_run_start_timestamp_seconds{{{s}}})) > {num(t.seconds(pl + "min_age"))}"""
    # Not improving, and not rising either (a rising loss is the divergence alert's).
    flat = f"""run:training_loss:improvement < {num(plateau_slope)}
            and run:training_loss:smoothed < {num(1 + t.number(pl + "max_rise"))} * min_over_time(run:training_loss:smoothed[{trend}])"""

    # Counts are rounded: increase() extrapolates to the window's edges, and "14.61 steps" reads oddly. It only
    # extrapolates upwards, so one event still counts as at least 1.
    return [Alert(*a) for a in (
        ("TrainingLossNotFinite", f"""
            round(sum by ({ids}) (
              increase(training_loss_nonfinite_total{{{s}}}[{nf_window}])
              + increase(training_grad_nonfinite_total{{{s}}}[{nf_window}])
            )) > 0
            or
            round(sum by ({ids}) (increase(training_scaler_skipped_steps_total{{{s}}}[{nf_window}])))
              > {num(t.number(nf + "max_skipped_ratio"))}
              * sum by ({ids}) (increase(training_step_duration_seconds_count{{{s}}}[{nf_window}]))""",
         t.duration(nf + "for"),
         "Training loss or gradients became NaN or infinite.",
         "Run {{ $labels.run }} had {{ $value | humanize }} steps with a NaN/Inf loss or gradients (or skipped by "
         "its gradient scaler, more than " + pct(t.number(nf + "max_skipped_ratio")) + " of steps) in the last "
         + nf_window + "."),
        ("TrainingGradientExplosion", f"""
            run:training_grad_norm:smoothed > {num(t.number(ge + "factor"))} * run:training_grad_norm:baseline
            or
            max by ({ids}) (max_over_time(training_grad_norm_recent_max{{{s}}}[{seconds(t.seconds(ge + "for") + t.seconds(ge + "window"))}]))
              > {num(t.number(ge + "ceiling"))}""",
         t.duration(ge + "for"),
         "Gradient norm jumped far above its recent level.",
         "Run {{ $labels.run }}: gradient norm {{ $value | humanize }}, more than "
         + num(t.number(ge + "factor")) + "x its median over the last " + t.duration("windows.baseline")
         + " or above the ceiling " + num(t.number(ge + "ceiling")) + "."),
        ("TrainingLossSpike", f"""
            max_over_time(run:training_loss:spike_ratio[{t.duration(ls + "window")}]) > {num(t.number(ls + "factor"))}""",
         t.duration(ls + "for"),
         "Training loss spiked.",
         "Run {{ $labels.run }}: a step's train loss reached {{ $value | humanize }}x the run's usual windowed "
         "maximum (threshold " + num(t.number(ls + "factor")) + "x) in the last " + t.duration(ls + "window") + "."),
        ("TrainingDiverging", f"""
            run:training_loss:relative_slope > {num(t.number(dv + "relative_slope"))}
            and
            run:training_loss:change_per_step > 0""",
         t.duration(dv + "for"),
         "Training loss trends upward.",
         "Run {{ $labels.run }}: the smoothed train loss rises by {{ $value | humanizePercentage }} per step "
         "(relative), over " + trend + "."),
        ("TrainingOverfitting", f"""
            run:training_eval_loss:latest{{split="{split}"}}
              > {num(1 + t.number(of + "val_rise"))} * min_over_time(run:training_eval_loss:latest{{split="{split}"}}[{lookback}])
            and ignoring (split)
            run:training_generalization_gap:trend > 0
            and ignoring (split)
            run:training_loss:smoothed < {num(1 + t.number(of + "train_near_best"))} * min_over_time(run:training_loss:smoothed[{lookback}])""",
         t.duration(of + "for"),
         "Validation loss rises while training loss falls: overfitting.",
         "Run {{ $labels.run }}: " + split + " loss {{ $value | humanize }} is more than "
         + pct(t.number(of + "val_rise")) + " above its best of the last " + lookback
         + " while the train loss stays at its best; the generalization gap widens."),
        ("TrainingPlateau", f"""
            {flat}
            and on ({ids}) {old_enough}
            unless on ({ids})
            run:training_eval_loss:latest{{split="{split}"}} < run:training_eval_loss:latest{{split="{split}"}} offset {trend}""",
         t.duration(pl + "for"),
         "Training and validation loss stopped improving: converged or stuck.",
         "Run {{ $labels.run }}: the best smoothed train loss improved by {{ $value | humanizePercentage }} per "
         "step over the last " + trend + " and the " + split + " loss is not improving."),
        ("TrainingLossDecreasingSlowly", f"""
            run:training_loss:improvement >= {num(plateau_slope)}
            and run:training_loss:improvement < {num(t.number(sl + "relative_improvement"))}
            and on ({ids}) {old_enough}""",
         t.duration(sl + "for"),
         "Training loss falls too slowly: the learning rate may be too low.",
         "Run {{ $labels.run }}: the best smoothed train loss improves by only {{ $value | humanizePercentage }} "
         "per step over the last " + trend + "."),
    )]
