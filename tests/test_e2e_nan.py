"""End to end: a real training run goes NaN; real Prometheus and Alertmanager deliver the alert to a webhook."""
import time

import pytest

from exporter.stack.servers import DEPLOY, DemoRun, LocalStack, free_port

pytestmark = pytest.mark.e2e
THRESHOLDS = DEPLOY / "prometheus" / "thresholds-demo.yaml"


def test_nan_alert_reaches_the_webhook_for_that_run_only(tmp_path, capsys):
    runs = [DemoRun("nan", "e2e-nan", free_port(), tmp_path / "runs", steps=800, linger=60),
            DemoRun("healthy", "e2e-healthy", free_port(), tmp_path / "runs", steps=800, linger=60)]
    try:
        with LocalStack(tmp_path / "stack", THRESHOLDS, [r.target for r in runs]) as stack:
            deadline = time.monotonic() + 120
            while not stack.webhook.alerts(alertname="TrainingLossNotFinite") and time.monotonic() < deadline:
                assert runs[0].proc.poll() is None, runs[0].log_tail()
                time.sleep(0.2)
            alerts = stack.webhook.alerts(alertname="TrainingLossNotFinite")
            assert alerts, f"no alert within 120s\n{runs[0].log_tail()}\n{stack.prometheus.log_tail()}"
            alert = alerts[0]
            assert alert["labels"]["run"] == "e2e-nan"
            assert alert["labels"]["severity"] == "critical"
            assert alert["receiver"] == "training-critical"
            assert alert["annotations"]["runbook_url"].endswith("#alert-name-traininglossnotfinite")
            delay = alert["received"] - runs[0].fault_time()
            with capsys.disabled():
                print(f"\nTrainingLossNotFinite detection delay (NaN step to webhook): {delay:.1f} s")
            assert 0 < delay < 60
            # The healthy run trains on to its end; it must not have sent anything meanwhile.
            while runs[1].proc.poll() is None and b"completed at step" not in runs[1].log_path.read_bytes():
                time.sleep(0.5)
            time.sleep(3)
            assert stack.webhook.alerts(run="e2e-healthy") == []
            assert {a["labels"]["run"] for a in stack.webhook.alerts()} == {"e2e-nan"}
    finally:
        for run in runs:
            run.stop()
