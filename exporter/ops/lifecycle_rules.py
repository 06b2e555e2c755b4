"""The run's lifecycle: hung and vanished runs."""
from __future__ import annotations

from typing import Dict, List

from .rules import Alert, num
from .thresholds import Thresholds


def recording(t: Thresholds) -> Dict[str, str]:
    """No lifecycle recording rules yet."""
    return {}


def alerts(t: Thresholds) -> List[Alert]:
    """The lifecycle alerts."""
    ids = t.identity
    s = t.text("selector")
    hg, td = "alerts.TrainingHung.", "alerts.TrainingTargetDown."
    running = f"""max by ({ids}) (training_run_status{{{s}, status="running"}}) == 1"""
    return [Alert(*a) for a in (
        ("TrainingHung", f"""
            time() - max by ({ids}) (
              training_last_step_timestamp_seconds{{{s}}}
              or training_eval_timestamp_seconds{{{s}}}
              or training_run_start_timestamp_seconds{{{s}}}
            ) > {num(t.seconds(hg + "after"))}
            and on ({ids}) {running}""",
         t.duration(hg + "for"),
         "A running training job stopped making steps.",
         "Run {{ $labels.run }} made no step for {{ $value | humanizeDuration }} and has not reported that it "
         "ended."),
        ("TrainingTargetDown", f"""
            count by ({ids}) (
              (max by ({ids}, instance) (last_over_time(training_run_status{{{s}, status="running"}}[{t.duration(td + "lookback")}])) == 1)
              unless on (job, instance)
              (up{{{s}}} == 1)
            )""",
         t.duration(td + "for"),
         "The exporter of a running training job cannot be scraped.",
         "Run {{ $labels.run }}: {{ $value }} exporter(s) whose last scrape said the run was running cannot be "
         "scraped now: the process died or the network broke."),
    )]
