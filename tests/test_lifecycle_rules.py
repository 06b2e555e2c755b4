"""The lifecycle rules (TrainingHung, TrainingTargetDown) on the issue's lifecycle rows, with promtool.

Each exporter process is built as Prometheus stores it, scraped once a minute: what a real exporter serves
(status, start time, phase, step timestamps and durations), a stale marker when a series leaves the
exposition (a phase that ended) or the target stops answering (the process died), nothing after. The last
test checks those assumptions (stale markers, `timestamp()`) on a real Prometheus with a real crash.
"""
import math
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import pytest
import yaml

from exporter import TrainingExporter
from exporter.ops import rules
from exporter.ops.thresholds import Thresholds, ThresholdsError
from exporter.stack.servers import DEPLOY, Prometheus, free_port
from promtool import RULES_DIR, THRESHOLDS, alert_test, fired, firing, generated_rules, write_and_run

STATUSES = ("running", "completed", "failed", "interrupted")


def proc(run: str, instance: str, minutes: int, *, start: int = 0, end: Optional[int] = None,
         step_seconds: float = 1.0, startup: int = 1, phases: Optional[Dict[int, str]] = None,
         stall: Tuple[int, Optional[int]] = (0, 0), status: Optional[Dict[int, str]] = None, rank: str = "0",
         **labels: str) -> List[Dict[str, str]]:
    """One exporter process scraped at minutes ``start`` .. ``end`` - 1 (a stale marker at ``end``).

    It is in "startup" for ``startup`` minutes, then in "train", making a step every ``step_seconds``;
    ``phases`` switches phase at the minutes given; no step is made in the minutes ``stall`` = (from, to),
    to=None for ever (a hang, or a wait in "train" while another rank saves a checkpoint); ``status``
    publishes an end status from the minutes given (``close()`` or SIGTERM).
    """
    end = minutes if end is None else end
    phases = {start: "startup", start + startup: "train", **(phases or {})}
    status = status or {}
    labels = {"job": "training", "instance": instance, "run": run, "rank": rank, **labels}
    out: Dict[str, List[Optional[str]]] = {}

    def put(key: str, minute: int, value: Optional[float]) -> None:
        out.setdefault(key, [None] * minutes)[minute] = None if value is None else f"{value:.10g}"

    phase, since, current = "startup", start * 60.0, "running"
    last: Optional[float] = None
    dur_sum = dur_count = 0.0
    stepping = False
    for m in range(start, end):
        now = m * 60.0
        current = status.get(m, current)
        if phases.get(m, phase) != phase:
            phase, since = phases[m], now
        stalled = stall[0] <= m and (stall[1] is None or m < stall[1])
        was_stepping, stepping = stepping, phase == "train" and current == "running" and not stalled
        if stepping and not was_stepping:
            if last is not None:  # the first step after a pause lasts the pause
                dur_sum += now - last
            last = now
        elif stepping:
            n = math.floor((now - last) / step_seconds + 1e-9)
            dur_sum += n * step_seconds
            dur_count += n
            last = now if abs(last + n * step_seconds - now) < 1e-6 else last + n * step_seconds
        put("training_run_start_timestamp_seconds", m, start * 60.0)
        for s in STATUSES:
            put(f'training_run_status{{status="{s}"}}', m, float(s == current))
        put(f'training_phase_start_timestamp_seconds{{phase="{phase}"}}', m, since)
        put("training_last_step_timestamp_seconds", m, last)
        put("training_last_progress_timestamp_seconds", m, max(since, last or since))
        put("training_step_duration_seconds_sum", m, dur_sum)
        put("training_step_duration_seconds_count", m, dur_count)

    series = []
    for key, values in out.items():
        name, _, inner = key.partition("{")
        pairs = dict(labels)
        if inner:
            k, v = inner.rstrip("}").split("=")
            pairs[k] = v.strip('"')
        # A series that leaves the exposition (the phase changed, the process is gone) gets a stale marker.
        text = []
        for m, v in enumerate(values):
            present_before = m > 0 and values[m - 1] is not None
            text.append(v if v is not None else ("stale" if present_before else "_"))
        series.append({"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(pairs.items())) + "}",
                       "values": " ".join(text)})
    return series


def alerts_over(tmp_path, series, minutes, rule_dir=None, evaluation="1m") -> List[tuple]:
    """Every (alertname, run) that fired at any time of ``minutes``."""
    test = {"name": "row", "interval": "1m", "input_series": series,
            "promql_expr_test": [dict(fired("row", minutes), exp_samples=[])]}
    result = write_and_run(tmp_path, [test], rule_dir or RULES_DIR, evaluation)
    if result.returncode == 0:
        return []
    out = result.stdout + result.stderr
    assert "got:" in out, out
    got = out.split("got:", 1)[1]
    return sorted({(a, r) for a, r in re.findall(r'alertname="(\w+)".*?run="([^"]*)"', got)})


def check(tmp_path, series, tests, rule_dir=None):
    group = {"name": "row", "interval": "1m", "input_series": series, "alert_rule_test": tests}
    result = write_and_run(tmp_path, [group], *([rule_dir] if rule_dir else []))
    assert result.returncode == 0, result.stdout + result.stderr


def down(description_minutes: str, **labels):
    return firing("TrainingTargetDown", f"Run r1 has not been scraped for {description_minutes}, and its last "
                  "scrape said it was running: its process died, its node failed or the network broke, and it "
                  "has not resumed anywhere.", **labels)


def hung(description_minutes: str, **labels):
    return firing("TrainingHung", f"Run r1 made no step for {description_minutes}, longer than its phase "
                  "allows, and has not reported that it ended.", **labels)


# ------------------------------------------------------------------------------------ ends and vanishings
def test_clean_exit_after_close_raises_nothing(tmp_path):
    """close() at minute 30; the final scrape (which close() waits for) says completed; the process exits."""
    series = proc("r1", "node-1:9945", 120, end=32, status={30: "completed"})
    assert alerts_over(tmp_path, series, 119) == []


def test_a_final_scrape_between_two_evaluations_is_still_a_clean_exit(tmp_path):
    """Rules evaluated less often than the target is scraped (every 2 minutes, scrapes every minute, as the trend
    group at 2 minutes against a 15 s scrape): the final scrape's "completed", current for one scrape interval
    only, falls between two evaluations (minute 29). The run still ended cleanly."""
    series = proc("r1", "node-1:9945", 120, end=30, status={29: "completed"})
    assert alerts_over(tmp_path, series, 119, evaluation="2m") == []


def test_exit_before_any_scrape_saw_the_end_is_target_down(tmp_path):
    """The same exit without a final scrape: for all Prometheus knows, the process died while running."""
    series = proc("r1", "node-1:9945", 60, end=30)
    assert alerts_over(tmp_path, series, 59) == [("TrainingTargetDown", "r1")]


def test_crash_is_target_down_after_its_for_never_hung(tmp_path):
    series = proc("r1", "node-1:9945", 90, end=30)
    check(tmp_path, series, [
        alert_test(34, "TrainingTargetDown"),  # pending since minute 30, `for: 5m`
        alert_test(36, "TrainingTargetDown", down("7m 0s")),  # last scraped running at minute 29
        alert_test(80, "TrainingTargetDown", down("51m 0s")),  # not resolved after an hour
        alert_test(80, "TrainingHung"),
    ])


def test_vanished_run_fires_until_vanished_for(tmp_path):
    variant = tmp_path / "thresholds.yaml"
    variant.write_text(f"extends: {THRESHOLDS}\nalerts:\n  TrainingTargetDown: {{vanished_for: 1h}}\n")
    rule_dir = generated_rules(tmp_path, variant)
    series = proc("r1", "node-1:9945", 120, end=30)
    check(tmp_path, series, [
        alert_test(85, "TrainingTargetDown", down("56m 0s")),
        alert_test(92, "TrainingTargetDown"),  # last seen running at minute 29, more than 1h ago
    ], rule_dir)


def test_resumed_elsewhere_is_quiet(tmp_path):
    """The process dies at minute 30 and the run resumes on another node 3 minutes later (within `for:`)."""
    series = (proc("r1", "node-1:9945", 120, end=30)
              + proc("r1", "node-2:9945", 120, start=33, startup=2))
    assert alerts_over(tmp_path, series, 119) == []


def test_resumed_late_resolves_when_the_run_returns(tmp_path):
    series = (proc("r1", "node-1:9945", 120, end=30)
              + proc("r1", "node-2:9945", 120, start=50, startup=2))
    check(tmp_path, series, [
        alert_test(45, "TrainingTargetDown", down("16m 0s")),
        alert_test(52, "TrainingTargetDown"),
        alert_test(119, "TrainingTargetDown"),
        alert_test(119, "TrainingHung"),
    ])


def test_node_reuse_on_the_same_port_does_not_hide_the_crash(tmp_path):
    """r1 dies at minute 30; r2 starts on the same node and port at minute 31: up{instance} is 1 again."""
    series = (proc("r1", "node-1:9945", 90, end=30)
              + proc("r2", "node-1:9945", 90, start=31))
    check(tmp_path, series, [alert_test(40, "TrainingTargetDown", down("11m 0s"))])
    assert alerts_over(tmp_path, series, 89) == [("TrainingTargetDown", "r1")]


def test_preemption_then_resumption_is_quiet(tmp_path):
    """SIGTERM at minute 30 publishes "interrupted" (scraped once), the process ends; the run resumes 20 minutes
    later on another node."""
    series = (proc("r1", "node-1:9945", 120, end=31, status={30: "interrupted"})
              + proc("r1", "node-3:9945", 120, start=50, startup=5))
    assert alerts_over(tmp_path, series, 119) == []


def test_crashed_run_that_said_failed_is_quiet(tmp_path):
    """An exception left the `with` block: "failed" was scraped, then the process exited."""
    series = proc("r1", "node-1:9945", 90, end=31, status={30: "failed"})
    assert alerts_over(tmp_path, series, 89) == []


# ------------------------------------------------------------------------------------------------- hangs
def test_rank_lost_while_the_others_wait_is_a_hang_not_target_down(tmp_path):
    """Rank 1's process dies at minute 30; rank 0 waits for it in a collective: the run is still scraped."""
    series = (proc("r1", "node-1:9945", 60, stall=(30, None))
              + proc("r1", "node-2:9945", 60, end=30, rank="1"))
    assert alerts_over(tmp_path, series, 59) == [("TrainingHung", "r1")]


def test_fast_run_that_stops_is_noticed_within_minutes(tmp_path):
    """100 steps/s: the allowance is the floor (2m), not 15 minutes. Last step at minute 29."""
    series = proc("r1", "node-1:9945", 60, step_seconds=0.01, stall=(30, None))
    check(tmp_path, series, [
        alert_test(32, "TrainingHung"),  # 3m without a step: over the floor, `for: 1m` not over
        alert_test(33, "TrainingHung", hung("4m 0s")),
        alert_test(33, "TrainingTargetDown"),
    ])


def test_slow_run_gets_an_allowance_from_its_own_step_time(tmp_path):
    """One step a minute: 20 steps' time, 20 minutes."""
    series = proc("r1", "node-1:9945", 90, step_seconds=60, stall=(30, None))
    check(tmp_path, series, [
        alert_test(49, "TrainingHung"),
        alert_test(51, "TrainingHung", hung("22m 0s")),
    ])


def test_18_minute_checkpoint_at_one_step_a_minute_is_quiet(tmp_path):
    """Rank 0 saves for 18 minutes inside exp.phase("checkpoint") while rank 1 waits in "train"."""
    series = (proc("r1", "node-1:9945", 120, step_seconds=60, phases={40: "checkpoint", 58: "train"})
              + proc("r1", "node-1:9946", 120, step_seconds=60, stall=(40, 58), rank="1"))
    assert alerts_over(tmp_path, series, 119) == []


def test_checkpoint_longer_than_the_step_allowance_needs_its_phase(tmp_path):
    marked = proc("r1", "node-1:9945", 120, step_seconds=60, phases={40: "checkpoint", 80: "train"})
    assert alerts_over(tmp_path, marked, 119) == []
    unmarked = proc("r1", "node-1:9945", 120, step_seconds=60, stall=(40, 80))
    assert alerts_over(tmp_path, unmarked, 119) == [("TrainingHung", "r1")]


def test_slow_startup_of_25_minutes_is_quiet(tmp_path):
    series = proc("r1", "node-1:9945", 90, startup=25)
    assert alerts_over(tmp_path, series, 89) == []


def test_startup_that_never_ends_is_hung(tmp_path):
    series = proc("r1", "node-1:9945", 90, startup=90)
    check(tmp_path, series, [
        alert_test(60, "TrainingHung"),
        alert_test(62, "TrainingHung", hung("1h 2m 0s")),
    ])


def test_hang_allowance_per_phase(tmp_path):
    series = (proc("fast", "n:1", 10, step_seconds=0.01) + proc("slow", "n:2", 10, step_seconds=30)
              + proc("ckpt", "n:3", 10, phases={5: "checkpoint"}) + proc("fresh", "n:4", 10, startup=20)
              + proc("custom", "n:5", 10, phases={5: "warmup_compile"})
              + proc("glacial", "n:6", 10, step_seconds=600))  # no step duration yet: the ceiling
    group = {"name": "allowance", "interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": "run:training_hang_allowance:seconds", "eval_time": "9m", "exp_samples": [
            {"labels": f'run:training_hang_allowance:seconds{{job="training",run="{run}"}}', "value": value}
            for run, value in (("fast", 120), ("slow", 600), ("ckpt", 3600), ("fresh", 3600), ("custom", 3600), ("glacial", 1800))]}]}
    result = write_and_run(tmp_path, [group])
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------- identity
def test_same_run_name_in_two_namespaces_stays_apart(tmp_path):
    """"r1" in namespaces a and b: a's process dies at minute 30, b hangs at minute 40; each alert names its
    own namespace, and neither hides the other's."""
    series = (proc("r1", "node-1:9945", 90, end=30, namespace="a")
              + proc("r1", "node-7:9945", 90, stall=(40, None), namespace="b"))
    check(tmp_path, series, [
        alert_test(60, "TrainingTargetDown", down("31m 0s", namespace="a")),
        alert_test(60, "TrainingHung", hung("21m 0s", namespace="b")),
    ])


# ------------------------------------------------------------------------------ a real Prometheus, real crash
CRASHING = """
import sys, time
from exporter import TrainingExporter
exp = TrainingExporter(run="r1", port=int(sys.argv[1]), addr="127.0.0.1")
print("ready", flush=True)
while True:
    exp.log_step(loss=1.0)
    time.sleep(0.05)
"""


def test_real_prometheus_crash_node_reuse_and_resume(tmp_path):
    """The demo-speed rules in a real Prometheus: r1 is killed (SIGKILL); r2 starts on the same port at once;
    r1 is TrainingTargetDown (never TrainingHung) and r2 has no alert; r1 resumes on another port and its
    alert resolves."""
    rule_dir = generated_rules(tmp_path, DEPLOY / "prometheus" / "thresholds-demo.yaml")
    node, other = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_dir / "*.rules.yml")],
        "scrape_configs": [{"job_name": "training", "static_configs": [
            {"targets": [f"127.0.0.1:{node}", f"127.0.0.1:{other}"]}]}]}))
    crashing = subprocess.Popen([sys.executable, "-c", CRASHING, str(node)], stdout=subprocess.PIPE, text=True)
    exporters = []
    try:
        assert crashing.stdout.readline().strip() == "ready"
        with Prometheus(config, tmp_path) as prom:
            prom.wait_ready()
            prom.wait_for('training_step{run="r1"} > 0')
            crashing.kill()
            crashing.wait(timeout=30)
            exporters.append(TrainingExporter(run="r2", port=node, addr="127.0.0.1", handle_sigterm=False))
            prom.wait_for('up{instance="127.0.0.1:%d"} == 1 and on (instance) training_run_status{run="r2"}' % node)
            down = prom.wait_for('ALERTS{alertname="TrainingTargetDown", alertstate="firing"}', timeout=60)
            assert [a["metric"]["run"] for a in down] == ["r1"]
            exporters.append(TrainingExporter(run="r1", port=other, addr="127.0.0.1", handle_sigterm=False))
            deadline = time.monotonic() + 30
            while prom.query('ALERTS{alertname="TrainingTargetDown"}') and time.monotonic() < deadline:
                time.sleep(0.5)
            assert prom.query('ALERTS{alertname="TrainingTargetDown"}') == []
            assert prom.query('count_over_time(ALERTS{alertname="TrainingHung"}[10m])') == []
            assert prom.query('count_over_time(ALERTS{run="r2"}[10m])') == []
    finally:
        crashing.kill()
        for exp in exporters:
            exp.close(stop_server=True)


def test_bad_lifecycle_thresholds_are_named(tmp_path):
    for change, message in (("TrainingHung: {phases: {train: 1h}}", "adapts to the step time"),
                            ("TrainingHung: {floor: 1h}", "floor must not exceed"),
                            ("TrainingHung: {phases: {eval: soon}}", "not a Prometheus duration"),
                            ("TrainingTargetDown: {vanished_for: 0}", "vanished_for")):
        variant = tmp_path / "bad.yaml"
        variant.write_text(f"extends: {THRESHOLDS}\nalerts:\n  {change}\n")
        with pytest.raises(ThresholdsError, match=message):
            rules.render(Thresholds.load(variant))
