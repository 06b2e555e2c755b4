"""The run's lifecycle: hung runs and runs that vanished, both keyed by the run's identity, never by instance.

- Hung: the run is being scraped, says it is running, and made no progress (a step, an evaluation, a phase
  change) for longer than the allowance of its phase. In "train" the allowance adapts to the run's own mean
  step time (``step_factor`` times it, between ``floor`` and ``ceiling``); start-up and the phases the loop
  marks (``exp.phase("checkpoint")``) have their own allowances.
- Vanished (target down): no exporter of the run is scraped any more, and the last scrape of the run said it
  was running. A run whose last scrape said completed, failed or interrupted ended cleanly; a run that resumed
  anywhere (another node, the same port after a restart) is back; another run reusing the node's port does
  not hide it. The alert lasts until the run returns or ``vanished_for`` passes.
"""
from __future__ import annotations

import textwrap
from typing import Dict, List

from .rules import Alert, num, seconds
from .thresholds import Thresholds, ThresholdsError

HG, TD = "alerts.TrainingHung.", "alerts.TrainingTargetDown."
ALLOWANCE = "run:training_hang_allowance:seconds"
LAST_SEEN_RUNNING = "run:training_run_status:last_seen_running"
LAST_SCRAPED = "run:training_run_status:last_scraped_timestamp"
PHASE = "training_phase_start_timestamp_seconds"
TRAIN = "train"


def phase_allowances(t: Thresholds) -> Dict[str, float]:
    """Seconds each named phase may last without progress (``TrainingHung.phases``); "train" adapts instead."""
    phases = t.get(HG + "phases")
    if not isinstance(phases, dict) or not phases:
        raise ThresholdsError(f"{t.source}: {HG}phases must map phase names to durations, got {phases!r}")
    for name in phases:
        if not isinstance(name, str) or not name.isidentifier() or name == TRAIN:
            raise ThresholdsError(f"{t.source}: {HG}phases: {name!r} is not a phase name (the allowance of "
                                  f"{TRAIN!r} adapts to the step time: set step_factor, floor and ceiling)")
    return {name: t.seconds(f"{HG}phases.{name}") for name in phases}


def seen_window(t: Thresholds) -> str:
    """How far back the last served status is looked for: at least two trend evaluations and 5 minutes."""
    return seconds(max(300.0, 2 * t.seconds("trend_evaluation_interval")))


def recording(t: Thresholds) -> Dict[str, str]:
    """The hang allowance of each run and when each run was last scraped (running or at all)."""
    ids, s = t.identity, t.text("selector")
    phases = phase_allowances(t)
    floor, ceiling = t.seconds(HG + "floor"), t.seconds(HG + "ceiling")
    if floor > ceiling:
        raise ThresholdsError(f"{t.source}: {HG}floor must not exceed {HG}ceiling")
    listed = "|".join([TRAIN, *phases])
    terms = [f'{PHASE}{{{s}, phase="{name}"}} * 0 + {num(sec)}' for name, sec in phases.items()]
    terms.append(f'{PHASE}{{{s}, phase!~"{listed}"}} * 0 + {num(t.seconds(HG + "other_phases"))}')
    # In "train" (and for an exporter that publishes no phase), the run's own mean step time; before the
    # second step there is none yet: the ceiling.
    terms.append(f"""(
  clamp(
    {num(t.number(HG + "step_factor"))} * training_step_duration_seconds_sum{{{s}}}
      / (training_step_duration_seconds_count{{{s}}} > 0),
    {num(floor)}, {num(ceiling)})
  or training_step_duration_seconds_count{{{s}}} * 0 + {num(ceiling)}
)
unless ignoring (phase) {PHASE}{{{s}, phase!="{TRAIN}"}}""")
    return {
        # Per rank, the allowance of its phase; per run, the most lenient rank's (one rank saves the
        # checkpoint while the others wait in "train").
        ALLOWANCE: f"max by ({ids}) (\n" + textwrap.indent("\nor ".join(terms), "  ") + "\n)",
        # 1 while the last status any process of the run served said running, 0 once the last said it ended.
        # A range, not an instant read: the final scrape's "completed" is current for one scrape interval
        # only (the process exits right after it), which an evaluation less frequent than the scrape misses.
        LAST_SEEN_RUNNING: f"""
            max by ({ids}) (last_over_time(training_run_status{{{s}, status="running"}}[{seen_window(t)}]))""",
        LAST_SCRAPED: f"""max by ({ids}) (timestamp(training_run_status{{{s}, status="running"}}))""",
    }


def fast_recording(t: Thresholds) -> Dict[str, str]:
    """None: the hang allowance and the last-scraped times change slowly (see ``trend_evaluation_interval``)."""
    return {}


def alerts(t: Thresholds) -> List[Alert]:
    """The lifecycle alerts."""
    ids, s = t.identity, t.text("selector")
    vanished_for = t.duration(TD + "vanished_for")
    return [Alert(*a) for a in (
        ("TrainingHung", f"""
            time() - max by ({ids}) (training_last_progress_timestamp_seconds{{{s}}})
            > on ({ids}) {ALLOWANCE}
            and on ({ids}) max by ({ids}) (training_run_status{{{s}, status="running"}}) == 1""",
         t.duration(HG + "for"),
         "A running training job stopped making steps.",
         "Run {{ $labels.run }} made no step for {{ $value | humanizeDuration }}, longer than its phase allows, "
         "and has not reported that it ended."),
        ("TrainingTargetDown", f"""
            time() - max_over_time({LAST_SCRAPED}[{vanished_for}])
            and on ({ids}) last_over_time({LAST_SEEN_RUNNING}[{vanished_for}]) == 1
            unless on ({ids}) training_run_status{{{s}, status="running"}}""",
         t.duration(TD + "for"),
         "The exporters of a running training job cannot be scraped.",
         "Run {{ $labels.run }} has not been scraped for {{ $value | humanizeDuration }}, and its last scrape "
         "said it was running: its process died, its node failed or the network broke, and it has not resumed "
         "anywhere."),
    )]
