"""End to end, as `make demo` runs it: every contract alert from a real training run, through real Prometheus
and Alertmanager to a webhook, for the right run only; healthy runs page nobody."""
import pytest

from conftest import QUIET
from exporter.stack.showcase import EXPECTED

pytestmark = pytest.mark.e2e


def test_every_pathology_raises_its_alert(showcase):
    assert showcase.missing() == [], showcase.summary()


@pytest.mark.parametrize("scenario", [s for s, alert in EXPECTED.items() if alert])
def test_alert_for_the_right_run_only(showcase, scenario):
    run = next(r for r in showcase.runs if r.scenario == scenario)
    fired = showcase.fired(run)
    assert EXPECTED[scenario] in fired
    assert showcase.unexpected(run) == [], fired
    # What is not a page is only the plateau rule saying the run converged or got stuck after its fault.
    assert {n for n, a in fired.items() if a.severity == "info"} <= {EXPECTED[scenario], "TrainingPlateau"}, fired
    # Delivered to the webhook, unless routed to the quiet receiver (info).
    delivered = {a["labels"]["alertname"] for a in showcase.stack.webhook.alerts(run=run.run)}
    if showcase.fired(run)[EXPECTED[scenario]].severity == "info":
        assert delivered == set()
    else:
        assert EXPECTED[scenario] in delivered


@pytest.mark.parametrize("run_name", [f"demo-{s}" for s in QUIET] + ["demo-healthy-finished"])
def test_healthy_runs_page_nobody(showcase, run_name):
    """No warning or critical alert, nothing delivered; at most an info plateau once the run has converged (a
    demo run converges within its minutes)."""
    run = next(r for r in showcase.runs if r.run == run_name)
    fired = showcase.fired(run)
    assert {(n, a.severity) for n, a in fired.items()} <= {("TrainingPlateau", "info")}, fired
    assert showcase.stack.webhook.alerts(run=run_name) == []


def test_finished_run_exited_without_hung_or_target_down(showcase):
    run = next(r for r in showcase.runs if r.run == "demo-healthy-finished")
    assert run.proc.poll() == 0, run.log_tail()
    status = showcase.stack.prometheus.query(
        'last_over_time(training_run_status{run="demo-healthy-finished",status="completed"}[10m])')
    assert [r["value"] for r in status] == [1.0]


def test_killed_process_is_target_down_naming_its_run(showcase):
    alerts = showcase.stack.webhook.alerts(alertname="TrainingTargetDown")
    assert {a["labels"]["run"] for a in alerts} == {"demo-crash"}


def test_detection_delay_table(showcase, capsys):
    rows = []
    for run in showcase.runs:
        for name, arrival in sorted(showcase.fired(run).items()):
            rows.append((name, run.run, "fault" if run.fault_time() else "start", showcase.delay(run, arrival)))
    with capsys.disabled():
        print("\n| alert | run | delay from | seconds |\n| --- | --- | --- | --- |")
        for name, run, origin, delay in sorted(rows):
            print(f"| {name} | {run} | {origin} | {delay:.1f} |")
    assert all(delay > 0 for *_, delay in rows)
