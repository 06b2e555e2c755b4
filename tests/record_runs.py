"""Record real demo training runs as per-scrape series for the promtool rule tests.

    python tests/record_runs.py [SCENARIO ...]      # writes tests/data/recorded/SCENARIO.json

Each scenario trains for real (CPU, a few seconds) with the exporter; every `STEPS_PER_SCRAPE` steps the
exporter's published state is sampled as one scrape. The tests replay the samples one minute apart, so a
recording reads as a job making STEPS_PER_SCRAPE steps a minute.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from exporter import TrainingExporter
from exporter.stack.demo import SCENARIOS, train

OUT = Path(__file__).resolve().parent / "data" / "recorded"
STEPS_PER_SCRAPE = 20
STEPS = 4800  # 240 scrapes: four hours at one scrape a minute
EVAL_EVERY = 200  # one evaluation each 10 scrapes
RECORDED = ("healthy", "noisy", "cosine", "stepdecay", "overfit", "spike", "explode", "diverge", "nan", "plateau")


def record(scenario: str) -> dict:
    exp = TrainingExporter(run=f"rec-{scenario}", port=0, addr="127.0.0.1", max_window=math.inf)
    st = exp.state
    samples = []
    original = exp.log_step

    seen = {"time": None, "at": None}

    def nonfinite_minute(minute):
        """The replay's time of the last non-finite step: the minute whose sample first saw it."""
        if st.last_nonfinite_time != seen["time"]:
            seen["time"], seen["at"] = st.last_nonfinite_time, minute * 60
        return seen["at"]

    def log_step(*args, **kwargs):
        original(*args, **kwargs)
        if st.step % STEPS_PER_SCRAPE == 0:
            minute = len(samples)
            loss_max, grad_max = st.recent_max(0.0)
            st._recent.clear()  # the next sample's maximum covers only its own steps
            samples.append({
                "training_step": st.step,
                "training_step_loss_sum": st.loss_sum,
                "training_step_loss_count": st.loss_count,
                "training_step_duration_seconds_count": st.step,
                'training_loss{split="train"}': st.losses.get("train"),
                'training_loss{split="val"}': st.losses.get("val"),
                "training_loss_recent_max": loss_max if loss_max > -math.inf else None,
                "training_grad_norm": st.grad_norm,
                "training_grad_norm_recent_max": grad_max if grad_max > -math.inf else None,
                "training_loss_nonfinite_total": st.loss_nonfinite,
                "training_grad_nonfinite_total": st.grad_nonfinite,
                "training_scaler_skipped_steps_total": st.skipped,
                "training_loss_steps_total": st.loss_count,
                "training_loss_positive_sum_total": st.loss_pos,
                "training_loss_negative_sum_total": st.loss_neg,
                "training_loss_squared_sum_total": st.loss_sq,
                "training_grad_norm_steps_total": st.grad_count,
                "training_grad_norm_sum_total": st.grad_sum,
                "training_last_nonfinite_timestamp_seconds": nonfinite_minute(minute),
                'training_evals_total{split="val"}': st.evals.get("val"),
                'training_eval_loss_best{split="val"}': st.eval_best.get("val"),
                'training_evals_since_best{split="val"}': st.evals_since_best.get("val"),
                "training_last_step_timestamp_seconds": minute * 60,
            })

    exp.log_step = log_step
    train(exp, SCENARIOS[scenario], steps=STEPS, eval_every=EVAL_EVERY, progress=None)
    exp.close(stop_server=True)
    series = {key: [_round(s[key]) for s in samples] for key in samples[0]}
    return {"scenario": scenario, "description": SCENARIOS[scenario].description,
            "steps_per_scrape": STEPS_PER_SCRAPE, "series": series}


def _round(value):
    """Six significant digits: what a dashboard shows, and small enough to keep in the repository."""
    if value is None or not math.isfinite(value):
        return None if value is None else str(value)
    return float(f"{value:.6g}")


def main(names) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or RECORDED:
        data = record(name)
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
        print(f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}: "
              f"{len(data['series']['training_step'])} scrapes")


if __name__ == "__main__":
    main(sys.argv[1:])
