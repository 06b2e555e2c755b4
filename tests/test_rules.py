"""The generated rules: up to date, valid, named from the metric definitions, one alert per run.

Every alert has a case where it fires with exact labels and annotations, a case where it has not fired yet
(before its `for:`), and the quiet cases of the issue produce no warning or critical alert.
"""
import re
import subprocess

import pytest
import yaml

from exporter.ops import lifecycle_rules, rules
from exporter.ops.thresholds import Thresholds, ThresholdsError, duration_seconds
from exporter.__main__ import main as cli
from exporter.metrics import sample_names
from exporter.stack.servers import binary
from promtool import (RULES_DIR, THRESHOLDS, alert_test, firing, input_series, synthetic,
                      write_and_run)

RUN = {"job": "training", "instance": "node-1:9945", "run": "r1", "rank": "0"}
CONTRACT_ALERTS = {"TrainingLossNotFinite": "critical", "TrainingGradientExplosion": "warning",
                   "TrainingLossSpike": "warning", "TrainingDiverging": "critical", "TrainingOverfitting": "warning",
                   "TrainingPlateau": "info", "TrainingHung": "critical", "TrainingTargetDown": "warning"}


def _alerts():
    doc = yaml.safe_load((RULES_DIR / rules.ALERTS_FILE).read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


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
    recorded = rules.recorded(Thresholds.load(THRESHOLDS))
    known = sample_names() | recorded | {"up"}
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                for name in re.findall(r"[a-z_:]*training_[a-z_:]*", rule["expr"]):
                    assert name in known, (rule.get("alert") or rule.get("record"), name)


def test_long_windows_read_one_series_per_run_and_trend_alerts_only_recordings():
    # The rules' cost at scale: every rank's series are read over the smoothing window at most (longer windows
    # scan the per-run recordings; the last served status over 5 minutes), and the alerts evaluated at the trend
    # interval read recordings only.
    t = Thresholds.load(THRESHOLDS)
    recorded, smoothing = rules.recorded(t), t.duration("windows.smoothing")
    assert lifecycle_rules.seen_window(t) == "300s" and smoothing == "5m"
    groups = {g["name"]: g for path in RULES_DIR.glob("*.yml") for g in yaml.safe_load(path.read_text())["groups"]}
    assert groups["training.rules"]["interval"] == groups["training.trend_alerts"]["interval"] == "2m"
    for rule in groups["training.rules"]["rules"]:
        for name, window in re.findall(r"(\w*training_\w+)\{[^}]*\}\[(\w+)\]", rule["expr"]):
            assert window in (smoothing, "300s"), (rule["record"], name, window)
    trend_alerts = groups["training.trend_alerts"]["rules"]
    assert {r["alert"] for r in trend_alerts} == {"TrainingDiverging", "TrainingOverfitting", "TrainingPlateau",
                                                  "TrainingLossDecreasingSlowly"}
    for rule in trend_alerts:
        assert set(re.findall(r"[a-z_:]*training_[a-z_:]*", rule["expr"])) <= recorded, rule["alert"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["windows"].pop("trend"), "missing key 'windows.trend'"),
    (lambda d: d["windows"].update(trend="30 minutes"), "windows.trend: '30 minutes' is not a Prometheus duration"),
    (lambda d: d["alerts"]["TrainingLossSpike"].update(sigmas=-1), "sigmas must be a positive number"),
    (lambda d: d.update(selector=""), "selector must be a non-empty string"),
    (lambda d: d.update(trend_evaluation_interval="15s"), "trend_evaluation_interval must be at least evaluation_interval"),
    (lambda d: d.update(trend_evaluation_interval="3m"), "trend_evaluation_interval must be at most half of windows.smoothing"),
    (lambda d: d["alerts"]["TrainingHung"].update(floor="30s", **{"for": "30s"}),
     "trend_evaluation_interval must be shorter than alerts.TrainingHung.floor + alerts.TrainingHung.for"),
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


# ------------------------------------------------------------------------- each alert, built by hand


def test_a_scaler_that_keeps_overflowing_is_reported_with_its_skipped_steps(tmp_path):
    # 60 steps a minute; from minute 10 the scaler skips 50 of them: no loss is non-finite, the alert's cause says
    # so and its value is the count of skipped steps in the last hour, not a time: 1,500 exactly; the per-run
    # windowed sum (loss_rules.over) weighs the window's last 5 minutes less, which on a count that began 29
    # minutes ago reads about 4% low.
    series = synthetic(40)
    series["training_scaler_skipped_steps_total"] = [0] * 10 + [50 * (m - 9) for m in range(10, 40)]
    fires = firing("TrainingLossNotFinite", "Run r1: about 1435 scaler-skipped steps in the last 1h, more than half of its "
                   "steps and at least 20: the loss scale keeps overflowing.", cause="scaler_overflow")
    group = {"name": "scaler", "interval": "1m", "input_series": input_series(series, RUN), "alert_rule_test": [
        alert_test(9, "TrainingLossNotFinite"), alert_test(39, "TrainingLossNotFinite", fires)]}
    result = write_and_run(tmp_path, [group])
    assert result.returncode == 0, result.stdout + result.stderr


def test_64_ranks_raise_one_alert_per_run(tmp_path):
    tests = []
    for rank in range(64):
        series = synthetic(30)
        series["training_loss_nonfinite_total"] = [0] * 20 + [1] * 10
        series["training_last_nonfinite_timestamp_seconds"] = [None] * 20 + [20 * 60 - 30] * 10
        group_labels = dict(RUN, rank=str(rank), instance=f"node-{rank // 8}:{9945 + rank % 8}")
        tests += input_series(series, group_labels)
    fires = firing(
        "TrainingLossNotFinite", "Run r1: a step with a NaN/Inf loss or gradients at 1970-01-01 00:19:30 +0000 UTC "
        "(within the last 5m).", cause="nonfinite")
    group = {"name": "64 ranks", "interval": "1m", "input_series": tests, "alert_rule_test": [
        alert_test(22, "TrainingLossNotFinite", fires)]}
    result = write_and_run(tmp_path, [group])
    assert result.returncode == 0, result.stdout + result.stderr



def test_a_run_that_exits_gets_no_smoothed_loss_from_older_steps(tmp_path):
    # One step a second, the loss falling from 2 to 1 over 40 minutes, then the process exits (stale markers).
    # Its fast window empties; the slow window's mean of older, higher losses must not stand in for it (it read as
    # a rise: TrainingDiverging at the end of healthy runs).
    scrapes, labels = 160, dict(RUN)
    losses = [2.0 - k / scrapes for k in range(scrapes)]
    steps = [15 * (k + 1) for k in range(scrapes)]
    positive = [sum(15 * x for x in losses[:k + 1]) for k in range(scrapes)]
    squares = [sum(15 * x * x for x in losses[:k + 1]) for k in range(scrapes)]
    series = {"training_loss_steps_total": steps, "training_loss_positive_sum_total": positive,
              "training_loss_negative_sum_total": [0.0] * scrapes, "training_loss_squared_sum_total": squares,
              'training_run_status{status="running"}': [1.0] * scrapes, "up": [1.0] * scrapes}
    inputs = [{"series": item["series"], "values": item["values"] + " stale"}
              for item in input_series(series, labels)]
    smoothed = "count(run:training_loss:smoothed)"
    group = {"name": "exit", "interval": "15s", "input_series": inputs,
             "promql_expr_test": [{"expr": smoothed, "eval_time": "39m", "exp_samples": [{"value": 1}]},
                                  {"expr": smoothed, "eval_time": "47m", "exp_samples": []},
                                  {"expr": smoothed, "eval_time": "60m", "exp_samples": []}],
             "alert_rule_test": [alert_test(m, "TrainingDiverging") for m in (41, 45, 50, 55, 60)]}
    result = write_and_run(tmp_path, [group])
    assert result.returncode == 0, result.stdout + result.stderr
