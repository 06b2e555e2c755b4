"""The generated rules: up to date, valid, and right on real recorded runs and on hand-built pathologies.

Every alert has a case where it fires with exact labels and annotations, a case where it has not fired yet
(before its `for:`), and the quiet cases of the issue produce no warning or critical alert.
"""
import math
import re
import subprocess

import pytest
import yaml

from exporter.ops import rules
from exporter.ops.thresholds import Thresholds, ThresholdsError, duration_seconds
from exporter.__main__ import main as cli
from exporter.metrics import sample_names
from exporter.stack.servers import binary
from promtool import (RULES_DIR, THRESHOLDS, alert_test, alerts_fired, firing, input_series, load_recorded, synthetic,
                      write_and_run)

RUN = {"job": "training", "instance": "node-1:9945", "run": "r1", "rank": "0"}
CONTRACT_ALERTS = {"TrainingLossNotFinite": "critical", "TrainingGradientExplosion": "warning",
                   "TrainingLossSpike": "warning", "TrainingDiverging": "critical", "TrainingOverfitting": "warning",
                   "TrainingPlateau": "info", "TrainingHung": "critical", "TrainingTargetDown": "warning"}


def _alerts():
    doc = yaml.safe_load((RULES_DIR / rules.ALERTS_FILE).read_text())
    return doc["groups"][0]["rules"]


def run_group(tmp_path, name, series, tests, run_labels=RUN):
    group = {"name": name, "interval": "1m", "input_series": input_series(series, run_labels),
             "alert_rule_test": tests}
    result = write_and_run(tmp_path, [group])
    assert result.returncode == 0, result.stdout + result.stderr


def severe(fired):
    return sorted(a["alertname"] for a in fired if a["severity"] != "info")


# ---------------------------------------------------------------------------------------------- the files
def test_committed_rules_equal_generated(tmp_path):
    rendered = rules.render(Thresholds.load(THRESHOLDS))
    for name, text in rendered.items():
        assert (RULES_DIR / name).read_text() == text, f"{name} is stale: run `make rules`"
    assert sorted(p.name for p in RULES_DIR.glob("*.yml")) == sorted(rendered)


def test_cli_generates_the_rule_files(tmp_path, capsys):
    assert cli(["rules", "--thresholds", str(THRESHOLDS), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([rules.ALERTS_FILE, rules.RECORDING_FILE])
    assert "wrote" in capsys.readouterr().out


def test_promtool_check_rules_is_clean():
    files = sorted(str(p) for p in RULES_DIR.glob("*.yml"))
    result = subprocess.run([binary("promtool"), "check", "rules", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_every_contract_alert_is_defined_with_severity_and_annotations():
    defined = {r["alert"]: r for r in _alerts()}
    for name, severity in CONTRACT_ALERTS.items():
        rule = defined[name]
        assert rule["labels"]["severity"] == severity
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url", "dashboard_url"}
        assert "{{ $labels.run }}" in rule["annotations"]["description"]
        assert "$value" in rule["annotations"]["description"]
        assert rule["for"], name


def test_rules_read_only_defined_metrics():
    recorded = {r["record"] for r in rules.recording_rules(Thresholds.load(THRESHOLDS))}
    known = sample_names() | recorded | {"up"}
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                for name in re.findall(r"[a-z_:]*training_[a-z_:]*", rule["expr"]):
                    assert name in known, (rule.get("alert") or rule.get("record"), name)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["windows"].pop("trend"), "missing key 'windows.trend'"),
    (lambda d: d["windows"].update(trend="30 minutes"), "windows.trend: '30 minutes' is not a Prometheus duration"),
    (lambda d: d["alerts"]["TrainingLossSpike"].update(factor=-1), "factor must be a positive number"),
    (lambda d: d.update(selector=""), "selector must be a non-empty string"),
])
def test_bad_thresholds_are_named(tmp_path, change, message):
    data = yaml.safe_load(THRESHOLDS.read_text())
    change(data)
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ThresholdsError, match=re.escape(message)):
        rules.write(path, tmp_path / "out")
    assert cli(["rules", "--thresholds", str(path), "--out", str(tmp_path / "out")]) == 2


def test_durations():
    assert duration_seconds("90s") == 90
    assert duration_seconds("1h30m") == 5400
    assert duration_seconds("250ms") == 0.25
    for bad in ("", "10", "1.5h", "m"):
        with pytest.raises(ValueError):
            duration_seconds(bad)


# ------------------------------------------------------------------------------ real recorded training runs
@pytest.mark.parametrize("scenario, expected", [
    ("healthy", []),
    ("noisy", []),
    ("cosine", []),
    ("stepdecay", []),
    ("overfit", ["TrainingOverfitting"]),
    ("spike", ["TrainingLossSpike"]),
    ("explode", ["TrainingGradientExplosion"]),
    # A loss that climbs without bound also spikes and blows up its gradients: all three are true.
    ("diverge", ["TrainingDiverging", "TrainingGradientExplosion", "TrainingLossSpike"]),
    ("nan", ["TrainingLossNotFinite"]),
    ("plateau", ["TrainingPlateau"]),
])
def test_recorded_run_raises_exactly_its_alerts(tmp_path, scenario, expected):
    series = load_recorded(scenario)
    minutes = len(series["training_step"]) - 1
    fired = alerts_fired(tmp_path, scenario, series, dict(RUN, run=scenario), minutes)
    assert sorted(a["alertname"] for a in fired) == sorted(expected)
    for alert in fired:
        assert alert["run"] == scenario
        assert alert["severity"] == CONTRACT_ALERTS[alert["alertname"]]


# ------------------------------------------------------------------------- each alert, built by hand
def test_nan_between_two_scrapes_fires_at_once(tmp_path):
    series = synthetic(40)
    series["training_loss_nonfinite_total"] = [0] * 20 + [1] * 20  # one NaN step, the next steps are fine
    fires = firing(
        "TrainingLossNotFinite", "Run r1 had 1 steps with a NaN/Inf loss or gradients (or skipped by its gradient "
        "scaler, more than 50% of steps) in the last 5m.")
    run_group(tmp_path, "nan", series, [
        alert_test(19, "TrainingLossNotFinite"),
        alert_test(20, "TrainingLossNotFinite", fires),
        alert_test(26, "TrainingLossNotFinite"),  # the window has passed
    ])


def test_gradient_scaler_occasional_skips_are_quiet_persistent_skips_fire(tmp_path):
    occasional = synthetic(60)
    occasional["training_scaler_skipped_steps_total"] = [m // 10 for m in range(60)]
    run_group(tmp_path, "scaler-occasional", occasional,
              [alert_test(m, "TrainingLossNotFinite") for m in range(5, 60, 5)])
    persistent = synthetic(60)
    persistent["training_scaler_skipped_steps_total"] = [0] * 30 + [60 * (m - 29) for m in range(30, 60)]
    fires = firing(
        "TrainingLossNotFinite", "Run r1 had 300 steps with a NaN/Inf loss or gradients (or skipped by its gradient "
        "scaler, more than 50% of steps) in the last 5m.")
    run_group(tmp_path, "scaler-persistent", persistent, [
        alert_test(29, "TrainingLossNotFinite"),
        alert_test(40, "TrainingLossNotFinite", fires),
    ])


def test_gradient_explosion_fires_after_its_for(tmp_path):
    series = synthetic(60, grad_norm=lambda s: 1.0 if s < 40 * 60 else 50.0)
    fires = firing(
        "TrainingGradientExplosion", "Run r1: gradient norm 50, more than 10x its median over the last 30m or above "
        "the ceiling 10000.")
    run_group(tmp_path, "explosion", series, [
        alert_test(42, "TrainingGradientExplosion"),  # pending
        alert_test(45, "TrainingGradientExplosion", fires),
    ])


def test_one_noisy_gradient_step_is_not_an_explosion(tmp_path):
    series = synthetic(60, grad_norm=lambda s: 80.0 if s == 30 * 60 + 59 else 1.0)
    assert max(series["training_grad_norm"]) == 80.0
    run_group(tmp_path, "grad-noise", series, [alert_test(m, "TrainingGradientExplosion") for m in range(25, 60, 2)])


def test_gradient_ceiling_fires_on_one_step(tmp_path):
    """One step above the ceiling, seen by a single scrape, is enough: the rule holds it past the `for:`."""
    series = synthetic(40, grad_norm=lambda s: 2e4 if s == 20 * 60 + 10 else 1.0)
    fires = firing(
        "TrainingGradientExplosion", "Run r1: gradient norm 20k, more than 10x its median over the last 30m or "
        "above the ceiling 10000.")
    run_group(tmp_path, "ceiling", series, [
        alert_test(21, "TrainingGradientExplosion"),  # pending
        alert_test(23, "TrainingGradientExplosion", fires),
        alert_test(30, "TrainingGradientExplosion"),  # held for `for` + `window` (4m), then it clears
    ])


def test_loss_spike_of_one_step_fires_and_clears(tmp_path):
    series = synthetic(60, loss=lambda s: 50.0 if s == 30 * 60 + 7 else 1.0)
    fires = firing(
        "TrainingLossSpike", "Run r1: a step's train loss reached 50x the run's usual windowed maximum (threshold "
        "3x) in the last 10m.")
    run_group(tmp_path, "spike", series, [
        alert_test(29, "TrainingLossSpike"),
        # promtool, like Prometheus, evaluates the recording and alerting groups independently: the alert may
        # see the spike one evaluation later.
        alert_test(32, "TrainingLossSpike", fires),
        alert_test(45, "TrainingLossSpike"),
    ])


def _diverging(steps_per_minute, rate):
    """Flat for 600 steps, then growing by ``rate`` per step: one curve over steps, sampled at any speed."""
    return synthetic(180, loss=lambda s: 1.0 if s < 600 else (1 + rate) ** (s - 600),
                     steps_per_minute=steps_per_minute)


@pytest.mark.parametrize("steps_per_minute", [10, 600])
def test_divergence_verdict_does_not_depend_on_speed(tmp_path, steps_per_minute):
    """The same curve over steps gives the same verdict at 10 steps a minute or 600."""
    rising = alerts_fired(tmp_path, "rising", _diverging(steps_per_minute, 2e-4), RUN, 179)
    assert "TrainingDiverging" in severe(rising)
    slow = alerts_fired(tmp_path, "slow", _diverging(steps_per_minute, 2e-5), RUN, 179)
    assert "TrainingDiverging" not in severe(slow)


def test_divergence_fires_after_its_for_with_value(tmp_path):
    series = synthetic(120, loss=lambda s: 1.0 if s < 60 * 60 else 1.0005 ** (s - 60 * 60))
    fires = firing(
        "TrainingDiverging", "Run r1: the smoothed train loss rises by 0.08106% per step (relative), over 30m.")
    # (1.0005^1800 - 1) / 1800 = 0.08106% once both ends of the trend window are past the knee at 60m.
    run_group(tmp_path, "diverging", series, [
        alert_test(70, "TrainingDiverging"),  # rising, but not for 15m yet
        alert_test(100, "TrainingDiverging", fires),
    ])


def _epochs(val_losses, minutes_per_epoch=40, train=lambda s: 2.0 * math.exp(-s / 4000) + 0.5):
    """Evaluations once an epoch (tens of minutes apart), with a falling train loss."""
    epochs = len(val_losses)
    return synthetic(epochs * minutes_per_epoch + 30, loss=train, val=lambda m: val_losses[m // minutes_per_epoch - 1],
                     eval_every=minutes_per_epoch)


def test_overfitting_with_one_evaluation_an_epoch(tmp_path):
    series = _epochs([1.5, 1.2, 1.1, 1.15, 1.3, 1.45])  # best at epoch 3; epoch 5 (200m) is 18% worse, 6th 32%
    fires = firing(
        "TrainingOverfitting", "Run r1: val loss 1.45 is more than 25% above its best of the last 6h while the train "
        "loss stays at its best; the generalization gap widens.", split="val")
    run_group(tmp_path, "overfitting", series, [
        alert_test(205, "TrainingOverfitting"),  # 18% above the best: within noise
        alert_test(245, "TrainingOverfitting"),  # 32% above, but not for 15m yet
        alert_test(256, "TrainingOverfitting", fires),
    ])


def test_noisy_evaluations_while_improving_are_not_overfitting(tmp_path):
    series = _epochs([1.5, 1.2, 1.3, 1.05, 1.15, 0.95, 1.1, 0.9])
    assert severe(alerts_fired(tmp_path, "val-noise", series, RUN, len(series["training_step"]) - 1)) == []


def test_plateau_is_info_and_fires_after_its_for(tmp_path):
    series = synthetic(180, loss=lambda s: max(0.5, 2.0 - s / 1200), val=lambda m: 0.6)
    fires = firing(
        "TrainingPlateau", "Run r1: the best smoothed train loss improved by 0% per step over the last 30m and "
        "the val loss is not improving.")
    run_group(tmp_path, "plateau", series, [
        alert_test(120, "TrainingPlateau"),  # flat since minute 30, no new best from about 65m: `for:` (1h) runs
        alert_test(150, "TrainingPlateau", fires),
    ])


def test_plateau_never_fires_in_a_young_run(tmp_path):
    """Flat from the first step: no new best from about minute 35, but the run is younger than min_age (1h)
    until minute 60, so the 1h `for:` starts only then."""
    series = synthetic(150, val=lambda m: 0.6)
    run_group(tmp_path, "young", series, [alert_test(110, "TrainingPlateau")])
    assert [a["alertname"] for a in alerts_fired(tmp_path, "young", series, RUN, 125)] == ["TrainingPlateau"]


def test_plateau_is_quiet_while_val_improves(tmp_path):
    series = synthetic(150, loss=lambda s: max(0.5, 2.0 - s / 1200), val=lambda m: 2.0 - m / 100)
    assert alerts_fired(tmp_path, "val-improves", series, RUN, 149) == []


def test_slow_progress_is_info(tmp_path):
    series = synthetic(240, loss=lambda s: 2.0 * math.exp(-s * 7e-5))  # -7% per 1000 steps
    fired = alerts_fired(tmp_path, "slow", series, RUN, 239)
    assert [(a["alertname"], a["severity"]) for a in fired] == [("TrainingLossDecreasingSlowly", "info")]
    # (1 - exp(-7e-5 * 1800)) / 1800 steps = 0.006577% per step, once both trend windows are past the start.
    fires = firing("TrainingLossDecreasingSlowly", "Run r1: the best smoothed train loss improves by only "
                   "0.006577% per step over the last 30m.")
    run_group(tmp_path, "slow-exact", series, [
        alert_test(170, "TrainingLossDecreasingSlowly"),  # slow since the start, but the run is young, then `for:`
        alert_test(200, "TrainingLossDecreasingSlowly", fires),
    ])


def test_64_ranks_raise_one_alert_per_run(tmp_path):
    tests = []
    for rank in range(64):
        series = synthetic(30)
        series["training_loss_nonfinite_total"] = [0] * 20 + [1] * 10
        group_labels = dict(RUN, rank=str(rank), instance=f"node-{rank // 8}:{9945 + rank % 8}")
        tests += input_series(series, group_labels)
    fires = firing(
        "TrainingLossNotFinite", "Run r1 had 64 steps with a NaN/Inf loss or gradients (or skipped by its gradient "
        "scaler, more than 50% of steps) in the last 5m.")
    group = {"name": "64 ranks", "interval": "1m", "input_series": tests, "alert_rule_test": [
        alert_test(22, "TrainingLossNotFinite", fires)]}
    result = write_and_run(tmp_path, [group])
    assert result.returncode == 0, result.stdout + result.stderr


def test_resumed_job_whose_step_jumps_is_quiet(tmp_path):
    """The process restarts from a checkpoint: its counters reset, the global step jumps ahead."""
    series = synthetic(240, loss=lambda s: 2.0 * math.exp(-s / 3000) + 0.2)
    restart = 120
    for key in ("training_step_loss_sum", "training_step_loss_count", "training_step_duration_seconds_count"):
        base = series[key][restart - 1]
        series[key] = series[key][:restart] + [None] * 3 + [v - base for v in series[key][restart + 3:]]
    series["training_step"] = series["training_step"][:restart] + [None] * 3 + [
        v + 50_000 for v in series["training_step"][restart + 3:]]
    series["training_run_start_timestamp_seconds"] = [0] * restart + [(restart + 3) * 60] * (240 - restart)
    assert severe(alerts_fired(tmp_path, "resumed", series, RUN, 239)) == []


def test_warmup_and_warm_restarts_are_quiet(tmp_path):
    def loss(s):
        if s < 600:  # warmup: the loss wobbles up before it falls
            return 2.0 + 0.3 * math.sin(s / 100)
        cycle = (s - 600) % 3600  # cosine with warm restarts every hour: the loss jumps back up 30%, then falls
        return (1.0 + 0.3 * (1 - cycle / 3600)) * math.exp(-(s - 600) / 20000)
    series = synthetic(240, loss=loss)
    assert severe(alerts_fired(tmp_path, "restarts", series, RUN, 239)) == []
