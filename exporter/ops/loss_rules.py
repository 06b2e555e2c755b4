"""The loss and gradient diagnoses of the seed: recording rules and alerts (non-finite, explosion, spike,
divergence, overfitting, plateau, slow progress).

Every verdict is sign- and offset-safe: the smoothed loss is a mean from sign-split sums, and loss changes are
compared with the run's own per-step noise (from the squared sum), never divided by the loss. Windows are the
longer of N steps and T minutes: each windowed quantity has a fast window and a slow one, and a run that makes
fewer than ``windows.min_steps`` steps in the fast window is judged on the slow one.
"""
from __future__ import annotations

from typing import Dict, List

from .rules import Alert, num
from .thresholds import Thresholds

# Seconds since the recording group's previous evaluation (the group's interval, unless Prometheus skipped one or
# was restarted; a promtool test evaluates at its own interval): the time each per-run sample stands for (``over``).
INTERVAL = "training:rule_evaluation:interval_seconds"
RANK_STEPS_RATE, STEPS_RATE = "run_rank:training_steps:rate", "run:training_steps:rate"
SKIPPED = "run:training_scaler_skipped_steps:increase_smoothing"
START = "run:training_run_start_timestamp_seconds:min"
LAST_NONFINITE = "run:training_last_nonfinite_timestamp_seconds:max"
# The alerts that read only the trend group's recordings (no scraped series): evaluated at its interval.
TREND_ALERTS = ("TrainingDiverging", "TrainingOverfitting", "TrainingPlateau", "TrainingLossDecreasingSlowly")


def over(series: str, w: str, unit: float) -> str:
    """The increase over ``w`` from a per-run recorded ``series`` that holds, at each evaluation, an increase over
    the last ``unit`` seconds (a rate: ``unit`` 1). Consecutive samples overlap: each moment of ``w`` is counted
    in about ``unit`` / (evaluation interval) of them. The moments of the window's last ``unit`` seconds are
    counted less, those of the ``unit`` before it more: on a steady rate the two cancel."""
    per_unit = "" if unit == 1 else f" / {num(unit)}"
    return f"sum_over_time({series}[{w}]) * scalar(avg_over_time({INTERVAL}[{w}])){per_unit}"


def recording(t: Thresholds) -> Dict[str, str]:
    """Series shared by dashboards and alerts, one per run unless the name says ``run_rank``."""
    s, ids = t.text("selector"), t.identity
    smooth, smooth_slow = t.duration("windows.smoothing"), t.duration("windows.smoothing_slow")
    trend, trend_slow = t.duration("windows.trend"), t.duration("windows.trend_slow")
    baseline, lookback = t.duration("windows.baseline"), t.duration("windows.lookback")
    split = t.text("eval_split")
    min_steps = num(t.number("windows.min_steps"))
    of = "alerts.TrainingOverfitting."
    evals = f'run:training_evals:count{{split="{split}"}}'
    eval_margin = (f'({num(t.number(of + "rise_eval_sigmas"))} + sqrt(2 * ln({evals})))'
                   f' * last_over_time(run:training_eval_loss:noise{{split="{split}"}}[{lookback}])')
    floor = (f'label_replace({num(t.number(of + "min_rise_noise"))} * run:training_loss:noise, '
             f'"split", "{split}", "", "")')

    # Range functions over every rank's series are the bulk of the evaluation cost at many runs, and their cost
    # grows with the window (samples) and the ranks (series). So every rank's counters are read over one short
    # window only, the smoothing window, and summed to one series per run; each longer window is taken over that
    # per-run series (1 series per run, one sample per evaluation, instead of every rank's every scrape). Each
    # windowed per-run sum is recorded once, named by the first role that uses its window, and read back by the
    # rules after it, which evaluate later in the same group at the same instant and so see the same value.
    role_of: Dict[str, str] = {}
    for role in ("smoothing", "smoothing_slow", "trend", "trend_slow", "baseline", "lookback"):
        role_of.setdefault(t.duration(f"windows.{role}"), role)
    per_run: Dict[str, str] = {
        # Read back from its own previous sample; the configured interval at the first evaluation.
        INTERVAL: f"time() - timestamp({INTERVAL}) or vector({num(t.seconds('trend_evaluation_interval'))})",
        # Optimizer steps per second of each rank, and of the run (from the per-process step counter, so a
        # resumed job whose global step jumps does not fake a flat slope).
        RANK_STEPS_RATE: f"sum by ({ids}, rank) (rate(training_step_duration_seconds_count{{{s}}}[{smooth}]))",
        STEPS_RATE: f"max by ({ids}) ({RANK_STEPS_RATE})",
        # Steps whose update a gradient scaler skipped; the same on every rank (the scaler's check is reduced
        # across ranks), so the largest rank's count is the run's.
        SKIPPED: f"max by ({ids}) (increase(training_scaler_skipped_steps_total{{{s}}}[{smooth}]))",
        # When the run's first exporter started (the plateau rules wait for the run to age), kept from its own
        # earlier samples over the lookback: a resumed process publishes its own later start, and the run would
        # be young again after every restart (absent once no process of the run is served).
        START: f"""
            min_over_time({START}[{lookback}]) < min by ({ids}) (training_run_start_timestamp_seconds{{{s}}})
            or
            min by ({ids}) (training_run_start_timestamp_seconds{{{s}}})""",
    }

    def increase(counter: str, w: str) -> str:
        name = f"run:{counter[:-len('_total')]}:increase_{role_of[w]}"
        if name not in per_run:
            per_run[name] = (f"sum by ({ids}) (increase({counter}{{{s}}}[{w}]))" if w == smooth else
                             over(increase(counter, smooth), w, t.seconds("windows.smoothing")))
        return name

    def steps(w: str) -> str:
        return increase("training_loss_steps_total", w)

    def mean(w: str) -> str:
        return (f"({increase('training_loss_positive_sum_total', w)}"
                f" - {increase('training_loss_negative_sum_total', w)}) / {steps(w)}")

    def std(w: str) -> str:
        """Standard deviation of the step losses over ``w`` (sign-safe: from the squared sum and the mean)."""
        return f"sqrt(clamp_min({squares(w)} / {steps(w)} - ({mean(w)}) ^ 2, 0))"

    def ladder(fast: str, slow: str, w: str, w_slow: str) -> str:
        """``fast`` where the run's mean step rate over ``w_slow`` gave at least min_steps steps per ``w`` at any
        time in the last ``w_slow``, else ``slow``. A run that stops (finished, exited, hung, paused for an
        evaluation outside a phase) keeps its fast window, which empties (no value, no verdict), instead of
        switching to a longer mean of older, higher losses that reads as a rise."""
        ratio = num(t.seconds(f"windows.{w_slow}") / t.seconds(f"windows.{w}") * t.number("windows.min_steps"))
        window = t.duration("windows." + w_slow)
        # Both branches are gated: once a process exits, its counters go stale and the fast branch is absent,
        # not empty, so an ungated ``or`` would still fall back to the slow one.
        fast_run = f"max_over_time({steps(window)}[{window}]) >= {ratio}"
        # The fast window also needs a quarter of min_steps in it: as a stopped run's fast window empties, a mean
        # of its last few steps is noise that a best-so-far would catch and a later value would read as a rise.
        filled = f"{steps(t.duration('windows.' + w))} >= {num(t.number('windows.min_steps') / 4)}"
        return f"""
            ({fast}) and on ({ids}) ({fast_run}) and on ({ids}) ({filled})
            or
            ({slow}) unless on ({ids}) ({fast_run})"""

    def grad_mean(w: str) -> str:
        return f"{increase('training_grad_norm_sum_total', w)} / {increase('training_grad_norm_steps_total', w)}"

    def squares(w: str) -> str:
        return increase("training_loss_squared_sum_total", w)

    # The learning rate is the same on every rank: reduced to one series per run and parameter group first, so
    # the long windows below scan one series per run instead of one per rank.
    lr = "run_param_group:training_learning_rate:max"
    rules = {
        # Exact mean of every step's train loss over the smoothing window (the slow one for slow runs), over all
        # ranks; sign-safe: the positive and negative parts are separate counters.
        "run:training_loss:smoothed": ladder(mean(smooth), mean(smooth_slow), "smoothing", "smoothing_slow"),
        # The run's own per-step noise: standard deviation of the step losses over the trend window (a trend
        # inside the window counts as noise, which errs on the quiet side).
        "run:training_loss:noise": ladder(
            std(trend), f"{std(trend_slow)} and on ({ids}) ({steps(trend_slow)} >= {min_steps})", "trend", "trend_slow"),
        # The same noise over the shortest window that holds min_steps steps: the smoothing window, else the
        # trend ladder above. Divergence is measured in it, so a fast run's steep first minutes, or the rise
        # itself, do not count as noise for half an hour.
        "run:training_loss:noise_recent": ladder(std(smooth), "run:training_loss:noise", "smoothing", "trend"),
        # The standard error of the smoothed loss (the step noise over the root of the steps it averages): the
        # lowest smoothed loss of a lookback sits a few of these below the level by chance alone.
        "run:training_loss:smoothed_error": ladder(
            f"run:training_loss:noise / sqrt({steps(smooth)})", f"run:training_loss:noise / sqrt({steps(smooth_slow)})",
            "smoothing", "smoothing_slow"),
        # The lowest smoothed loss of the lookback window: divergence is measured from it.
        "run:training_loss:best": f"""
            min_over_time(run:training_loss:smoothed[{lookback}])""",
        # How far the loss stands above that best, in units of its recent per-step noise.
        "run:training_loss:rise_sigmas": """
            (run:training_loss:smoothed - run:training_loss:best) / (run:training_loss:noise_recent > 0)""",
        # Change of the smoothed loss over one smoothing window (the slow one for slow runs): above 0 while the
        # loss still rises.
        "run:training_loss:recent_change": ladder(
            f"run:training_loss:smoothed - run:training_loss:smoothed offset {smooth}",
            f"run:training_loss:smoothed - run:training_loss:smoothed offset {smooth_slow}", "smoothing", "smoothing_slow"),
        # Improvement of the best smoothed loss over the plateau window against the window before, in noise units
        # (sign-safe: a difference of losses).
        "run:training_loss:improvement_sigmas": ladder(
            f"(min_over_time(run:training_loss:smoothed[{t.duration('alerts.TrainingPlateau.window')}] offset "
            f"{t.duration('alerts.TrainingPlateau.window')}) - min_over_time(run:training_loss:smoothed"
            f"[{t.duration('alerts.TrainingPlateau.window')}])) / (run:training_loss:noise > 0)",
            f"(min_over_time(run:training_loss:smoothed[{trend_slow}] offset {trend_slow}) - "
            f"min_over_time(run:training_loss:smoothed[{trend_slow}])) / (run:training_loss:noise > 0)",
            "trend", "trend_slow"),
        # Steps made over the trend window.
        "run:training_step:advance": over(STEPS_RATE, trend, 1),
        # The seed's moving-average slope, per step: loss units per optimizer step over the trend window.
        "run:training_loss:slope": f"""
            (run:training_loss:smoothed - run:training_loss:smoothed offset {trend})
              /
            (run:training_step:advance > 0)""",
        # Loss change per step over the smoothing window (the seed's third instability plot).
        "run:training_loss:change_per_step": f"""
            (run:training_loss:smoothed - run:training_loss:smoothed offset {smooth})
              /
            ({STEPS_RATE} * {num(t.seconds("windows.smoothing"))} > 0)""",
        # The learning rate relative to its highest value of the lookback window: near 1 the schedule has not
        # annealed it (a flat loss is stuck), near 0 it has (converged).
        "run:training_learning_rate:fraction_of_peak": f"""
            max by ({ids}) ({lr})
              / max by ({ids}) (max_over_time({lr}[{lookback}]))""",
        # Above 1 while the learning rate stands above its lowest value of the trend window: a warmup or a warm
        # restart, after which a higher loss is expected.
        "run:training_learning_rate:rise": ladder(
            f"max by ({ids}) ({lr}) / max by ({ids}) (min_over_time({lr}[{trend}]))",
            f"max by ({ids}) ({lr}) / max by ({ids}) (min_over_time({lr}[{trend_slow}]))",
            "trend", "trend_slow"),
        "run:training_eval_loss:latest": f"""
            avg by ({ids}, split) (training_loss{{{s}, split!="train"}})""",
        # The best eval loss of the run's current process(es), and of the run over the lookback: a resumed
        # process starts its own best, and would otherwise hide an overfitting that began before the restart.
        "run:training_eval_loss:best_process": f"""
            min by ({ids}, split) (training_eval_loss_best{{{s}}})""",
        "run:training_eval_loss:best": f"""
            min_over_time(run:training_eval_loss:best_process[{lookback}])""",
        # Evaluations since the run's best: the process's own count, or, while the best belongs to an earlier
        # process, every evaluation of this one.
        "run:training_evals:since_best": f"""
            max by ({ids}, split) (training_evals_since_best{{{s}}})
              unless on ({ids}, split) (run:training_eval_loss:best_process > run:training_eval_loss:best)
            or
            max by ({ids}, split) (training_evals_total{{{s}}})
              and on ({ids}, split) (run:training_eval_loss:best_process > run:training_eval_loss:best)""",
        # The noise of one evaluation, from the exporter's spread of its recent evaluations; the largest rank's,
        # which errs on the quiet side when ranks evaluate shards whose mean is less noisy.
        "run:training_eval_loss:noise": f"""
            max by ({ids}, split) (training_eval_loss_noise{{{s}}})""",
        # Evaluations of each split by the run's process (the best is the lowest of this many).
        "run:training_evals:count": f"""
            max by ({ids}, split) (training_evals_total{{{s}}})""",
        # How far the eval split's loss may stand above its best by noise alone: (rise_eval_sigmas + sqrt(2 ln N))
        # deviations of the evaluations' own noise (the best is the lowest of N noisy ones); the run's last
        # estimate over the lookback, so a resumed process that has not measured its own yet is judged by it.
        # Never below min_rise_noise of them (evaluations that repeat exactly measure a noise of 0). Without an
        # estimate, rise_noise deviations of the train step noise, which assumes evaluations no noisier than a
        # train step.
        "run:training_eval_loss:rise_margin": f"""
            ({eval_margin}) >= {floor}
            or
            {floor} and on ({ids}, split) ({eval_margin})
            or on ({ids})
            label_replace({num(t.number(of + "rise_noise"))} * run:training_loss:noise, "split", "{split}", "", "")""",
        # The seed's generalization gap: latest eval loss minus the smoothed train loss.
        "run:training_generalization_gap:current": f"""
            run:training_eval_loss:latest{{split="{split}"}} - ignoring (split) run:training_loss:smoothed""",
        "run:training_generalization_gap:trend": f"""
            run:training_generalization_gap:current - run:training_generalization_gap:current offset {trend}""",
        # Exact mean gradient norm of the steps over the smoothing window and over the baseline window.
        "run:training_grad_norm:smoothed": ladder(grad_mean(smooth), grad_mean(smooth_slow), "smoothing",
                                                  "smoothing_slow"),
        "run:training_grad_norm:baseline": ladder(grad_mean(baseline), grad_mean(lookback), "baseline", "lookback"),
        "run:training_samples:rate": f"""
            sum by ({ids}) (rate(training_samples_total{{{s}}}[{smooth}]))""",
        # Per-rank step time: a straggler shows here.
        "run_rank:training_step_duration_seconds:mean": f"""
            sum by ({ids}, rank) (rate(training_step_duration_seconds_sum{{{s}}}[{smooth}]))
              /
            {RANK_STEPS_RATE}""",
        # The global gradient norm of a job with sharded gradients (FSDP2), from each rank's share of the squared
        # norm: the exporter starts no collective. Ranks are sampled at their own last step.
        "run:training_grad_norm:global": f"""
            sqrt(sum by ({ids}) (training_grad_norm_shard_squared{{{s}}}))""",
    }
    # Recorded before the rules that read them, which the group evaluates after.
    return {**per_run, lr: f"max by ({ids}, param_group) (training_learning_rate{{{s}}})", **rules}


def fast_recording(t: Thresholds) -> Dict[str, str]:
    """The recordings that must be as fresh as a scrape: evaluated with the alerts."""
    ids, s = t.identity, t.text("selector")
    return {
        # How far the largest recent step loss (the exporter's maximum over its last ``max_window``, which a
        # slower evaluation could miss) stands above the smoothed loss, in noise units: the spike signal.
        "run:training_loss:spike_sigmas": f"""
            (max by ({ids}) (training_loss_recent_max{{{s}}}) - run:training_loss:smoothed)
              / (run:training_loss:noise > 0)""",
        LAST_NONFINITE: f"max by ({ids}) (training_last_nonfinite_timestamp_seconds{{{s}}})",
    }


def alerts(t: Thresholds) -> List[Alert]:
    """The loss and gradient alerts."""
    ids, s = t.identity, t.text("selector")
    lookback, split = t.duration("windows.lookback"), t.text("eval_split")
    a = "alerts."
    nf, ge, ls = a + "TrainingLossNotFinite.", a + "TrainingGradientExplosion.", a + "TrainingLossSpike."
    dv, of, pl = a + "TrainingDiverging.", a + "TrainingOverfitting.", a + "TrainingPlateau."
    sl = a + "TrainingLossDecreasingSlowly."
    nf_window, skip_window = t.duration(nf + "window"), t.duration(nf + "scaler_window")
    old_enough = f"(time() - {START}) > {num(t.seconds(pl + 'min_age'))}"
    annealed = num(t.number(pl + "annealed_lr_fraction"))
    flat = f"run:training_loss:improvement_sigmas < {num(t.number(pl + 'improvement_sigmas'))}"
    val_improving = (f"(run:training_eval_loss:best{{split=\"{split}\"}} offset {t.duration(pl + 'window')}"
                     f" - run:training_eval_loss:best{{split=\"{split}\"}})"
                     f" > ignoring (split) ({num(t.number(pl + 'improvement_sigmas'))} * run:training_loss:noise)")
    skipped = over(SKIPPED, skip_window, t.seconds("windows.smoothing"))
    last_nf = LAST_NONFINITE
    # The second branch is a run first scraped with a non-finite step behind it (before its process's first
    # scrape, or during a Prometheus outage). It reads every rank's series: the recorded one has no past when
    # the rules are first loaded, and would page for every run with an old non-finite step.
    return [Alert(*x)._replace(trend=x[0] in TREND_ALERTS) for x in (
        ("TrainingLossNotFinite", f"""
            label_replace(
              {last_nf} > {last_nf} offset {nf_window}
              or
              ({last_nf} unless max by ({ids}) (training_last_nonfinite_timestamp_seconds{{{s}}} offset {nf_window})),
                          "cause", "nonfinite", "", "")
            or
            label_replace(
              round({skipped}) > {num(t.number(nf + "max_skipped_ratio"))} * {over(STEPS_RATE, skip_window, 1)}
              and
              round({skipped}) >= {num(t.number(nf + "min_skipped_steps"))},
              "cause", "scaler_overflow", "", "")""",
         t.duration(nf + "for"),
         "Training loss or gradients became NaN or infinite.",
         # The label cause tells the value's kind: a Unix time (a non-finite step) or a count (scaler skips).
         "Run {{ $labels.run }}: {{ if eq $labels.cause \"nonfinite\" }}a step with a NaN/Inf loss or gradients "
         "at {{ $value | humanizeTimestamp }} (within the last " + nf_window + "){{ else }}about {{ $value }} "
         "scaler-skipped steps in the last " + skip_window + ", more than half of its steps and at least "
         + num(t.number(nf + "min_skipped_steps")) + ": the loss scale keeps overflowing{{ end }}."),
        ("TrainingGradientExplosion", f"""
            max by ({ids}) (max_over_time(training_grad_norm_recent_max{{{s}}}[{t.duration(ge + "window")}]))
              > {num(t.number(ge + "factor"))} * run:training_grad_norm:baseline
            or
            run:training_grad_norm:smoothed
              > {num(t.number(ge + "growth_factor"))} * min_over_time(run:training_grad_norm:smoothed[{lookback}])""",
         t.duration(ge + "for"),
         "Gradient norm jumped far above its recent level.",
         "Run {{ $labels.run }}: gradient norm {{ $value | humanize }}, more than "
         + num(t.number(ge + "factor")) + "x the run's mean norm over the last " + t.duration("windows.baseline")
         + " (or its mean grew " + num(t.number(ge + "growth_factor")) + "x over " + lookback + ")."),
        ("TrainingLossSpike", f"""
            max_over_time(run:training_loss:spike_sigmas[{t.duration(ls + "window")}]) > {num(t.number(ls + "sigmas"))}""",
         t.duration(ls + "for"),
         "Training loss spiked.",
         "Run {{ $labels.run }}: a step's train loss stood {{ $value | humanize }} standard deviations of the run's "
         "own step noise above its smoothed loss (threshold " + num(t.number(ls + "sigmas")) + ") in the last "
         + t.duration(ls + "window") + "."),
        ("TrainingDiverging", f"""
            run:training_loss:rise_sigmas > {num(t.number(dv + "rise_sigmas"))}
            and
            run:training_loss:recent_change > 0
            unless on ({ids})
            run:training_learning_rate:rise > {num(t.number(dv + "lr_rise"))}""",
         t.duration(dv + "for"),
         "Training loss trends upward.",
         "Run {{ $labels.run }}: the smoothed train loss stands {{ $value | humanize }} standard deviations of its "
         "recent step noise above its best of the last " + lookback + ", and rose over the last "
         + t.duration("windows.smoothing") + " (" + t.duration("windows.smoothing_slow") + " for slow runs)."),
        ("TrainingOverfitting", f"""
            run:training_evals:since_best{{split="{split}"}} >= {num(t.number(of + "patience_evals"))}
            and on ({ids})
            (
              run:training_eval_loss:latest{{split="{split}"}} - run:training_eval_loss:best{{split="{split}"}}
              > ignoring (split)
              {num(t.number(of + "gap_widening"))} * abs(run:training_eval_loss:best{{split="{split}"}}
                - ignoring (split) min_over_time(run:training_loss:smoothed[{lookback}]))
            )
            and on ({ids})
            (
              run:training_eval_loss:latest{{split="{split}"}} - run:training_eval_loss:best{{split="{split}"}}
              > run:training_eval_loss:rise_margin
            )
            and on ({ids})
            run:training_loss:smoothed
              <= min_over_time(run:training_loss:smoothed[{lookback}])
              + {num(t.number(of + "train_near_best_sigmas"))} * run:training_loss:noise
              + {num(t.number(of + "train_best_errors"))} * run:training_loss:smoothed_error""",
         t.duration(of + "for"),
         "Validation loss rises while training loss falls: overfitting.",
         "Run {{ $labels.run }}: " + split + " loss has not improved for {{ $value }} evaluations and stands above "
         "its best by more than " + num(100 * t.number(of + "gap_widening")) + "% of the gap between that best "
         "and the lowest smoothed train loss, and beyond the evaluations' own noise, while the train loss keeps "
         "at its lowest of the last " + lookback + "."),
        ("TrainingPlateau", f"""
            (
            label_replace(
              {flat} and on ({ids}) (run:training_learning_rate:fraction_of_peak >= {annealed}),
              "cause", "stuck", "", "")
            or
            label_replace(
              {flat} and on ({ids}) (run:training_learning_rate:fraction_of_peak < {annealed}),
              "cause", "converged", "", "")
            or
            label_replace({flat} unless on ({ids}) run:training_learning_rate:fraction_of_peak, "cause", "unknown", "", "")
            ) and on ({ids}) {old_enough}
            unless on ({ids}) ({val_improving})""",
         t.duration(pl + "for"),
         "Training and validation loss stopped improving: converged or stuck.",
         "Run {{ $labels.run }} ({{ $labels.cause }}: stuck while the learning rate is still at least "
         + num(100 * t.number(pl + "annealed_lr_fraction")) + "% of its peak, converged once the schedule annealed "
         "it): the best smoothed train loss improved by {{ $value | humanize }} standard deviations of its step "
         "noise over the last plateau window and the " + split + " loss is not improving."),
        ("TrainingLossDecreasingSlowly", f"""
            run:training_loss:improvement_sigmas >= {num(t.number(pl + "improvement_sigmas"))}
            and run:training_loss:improvement_sigmas < {num(t.number(sl + "improvement_sigmas"))}
            and on ({ids}) run:training_learning_rate:fraction_of_peak >= {annealed}
            and on ({ids}) {old_enough}""",
         t.duration(sl + "for"),
         "Training loss falls too slowly: the learning rate may be too low.",
         "Run {{ $labels.run }}: the best smoothed train loss improves by only {{ $value | humanize }} standard "
         "deviations of its step noise per plateau window while the learning rate has not been annealed."),
    )]
