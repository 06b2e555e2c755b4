"""Fleet incidents and inhibition across scopes, with the real Prometheus and Alertmanager: one page per incident.

Time runs about 20 times faster than in production: the thresholds are the demo's second-scale ones, TrainingHung
fires 6 s + 1 s after a run's last step, and the fleet window is 12 s (production: 5m). Every test prints the
notifications it counted.
"""
import json
import threading
import time
import urllib.request

import pytest
import yaml

from exporter import TrainingExporter
from exporter.ops import alertmanager
from exporter.ops.rules import write as write_rules
from exporter.stack.servers import (DEPLOY, Alertmanager, Prometheus, WebhookReceiver, alertmanager_config,
                                    free_port, prometheus_config)

FLEET_WINDOW = 12


def fast_thresholds(tmp_path, fleet_window=FLEET_WINDOW, **alerting):
    """The demo thresholds with a second-scale hang, fleet window and failed-notification window."""
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump({
        "extends": str(DEPLOY / "prometheus" / "thresholds-demo.yaml"),
        "alerts": {"TrainingHung": {"floor": "6s", "ceiling": "6s", "for": "1s"}},
        "alerting": {"fleet_min_runs": 5, "fleet_window": f"{fleet_window}s", "notifications_failed_window": "20s",
                     **alerting},
    }))
    return path


def post_alerts(am, *label_sets):
    """Send alerts to Alertmanager's API as Prometheus does."""
    body = json.dumps([{"labels": labels, "annotations": {"summary": "test"}} for labels in label_sets]).encode()
    request = urllib.request.Request(f"{am.url}/api/v2/alerts", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()


def am_alerts(am, **labels):
    with urllib.request.urlopen(f"{am.url}/api/v2/alerts", timeout=5) as response:
        alerts = json.loads(response.read())
    return [a for a in alerts if all(a["labels"].get(k) == v for k, v in labels.items())]


def wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout}s: {what}")


def counted(webhook):
    """(receiver, group labels) of every firing notification, for the test log."""
    return [(n["receiver"], n["group_labels"]) for n in webhook.firing_notifications()]


class Runs:
    """Training exporters in this process, each stepping twice a second until it is stalled."""

    def __init__(self, names):
        self.exporters = {name: TrainingExporter(run=name, port=0, addr="127.0.0.1") for name in names}
        self.stalled = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._step, daemon=True)
        self._thread.start()

    def _step(self):
        while not self._stop.wait(0.5):
            for name, exp in self.exporters.items():
                if name not in self.stalled:
                    exp.log_step(loss=1.0, samples=8)

    def targets(self, *names):
        return [f"127.0.0.1:{self.exporters[n].port}" for n in names]

    def close(self):
        self._stop.set()
        self._thread.join()
        for exp in self.exporters.values():
            exp.close(stop_server=True)


@pytest.mark.e2e
def test_fifty_runs_stalling_together_page_once(tmp_path, capsys):
    thresholds = fast_thresholds(tmp_path)
    fleet = [f"shard-{i:02d}" for i in range(50)]
    runs = Runs(fleet + ["elsewhere"])
    webhook = WebhookReceiver()
    am = prom = None
    try:
        am = Alertmanager(alertmanager_config(tmp_path / "am", webhook.url, thresholds), tmp_path / "am")
        write_rules(thresholds, tmp_path / "rules")
        port = free_port()
        config = prometheus_config(tmp_path / "prom", [], tmp_path / "rules", f"127.0.0.1:{am.port}", port)
        # Two scopes: the 50 runs share cluster and namespace; one more run trains on elsewhere.
        (tmp_path / "prom" / "targets" / "scopes.json").write_text(json.dumps([
            {"targets": runs.targets(*fleet), "labels": {"cluster": "eu-1", "namespace": "llm"}},
            {"targets": runs.targets("elsewhere"), "labels": {"cluster": "us-1", "namespace": "llm"}},
        ]))
        prom = Prometheus(config, tmp_path / "prom", port=port)
        am.wait_ready()
        prom.wait_ready()
        prom.wait_for('count(up{job="training"} == 1) == 51', timeout=60)
        prom.wait_for('count(training_run_status{status="running"} == 1) == 51', timeout=30)
        # One storage stall: the 50 runs stop within 6 s (2 minutes at the production scale).
        for name in fleet:
            runs.stalled.add(name)
            time.sleep(6 / len(fleet))
        wait(lambda: webhook.firing_notifications(), 60, "a notification")
        wait(lambda: len(am_alerts(am, alertname="TrainingHung")) == 50, 60, "50 TrainingHung in Alertmanager")
        # Every run's own notification has waited its fleet window by now.
        time.sleep(FLEET_WINDOW + 5)
        notifications = counted(webhook)
        with capsys.disabled():
            print(f"\n50 runs stalled within 6 s: {len(notifications)} notification(s): {notifications}")
        assert notifications == [("training-critical",
                                  {"alertname": "TrainingFleetHung", "cluster": "eu-1", "namespace": "llm",
                                   "job": "training"})]
        hung = am_alerts(am, alertname="TrainingHung")
        assert {a["labels"]["run"] for a in hung} == set(fleet)
        assert all(a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"] for a in hung)
        assert am_alerts(am, run="elsewhere") == []
    finally:
        for server in (prom, am):
            if server is not None:
                server.stop()
        webhook.stop()
        runs.close()


@pytest.mark.e2e
def test_two_clusters_with_one_run_name_do_not_inhibit_each_other(tmp_path, capsys):
    thresholds = fast_thresholds(tmp_path, fleet_window=3)
    webhook = WebhookReceiver()
    try:
        with Alertmanager(alertmanager_config(tmp_path / "am", webhook.url, thresholds), tmp_path / "am") as am:
            am.wait_ready()
            run = {"namespace": "llm", "job": "training", "run": "bert-lr1e-3"}
            a, b = dict(run, cluster="eu-1"), dict(run, cluster="us-1")
            post_alerts(am,
                        # eu-1: the run diverges; its spike and explosion are the divergence's symptoms.
                        dict(a, alertname="TrainingDiverging", severity="critical"),
                        dict(a, alertname="TrainingLossSpike", severity="warning"),
                        dict(a, alertname="TrainingGradientExplosion", severity="warning"),
                        # us-1: the run with the same name only spikes.
                        dict(b, alertname="TrainingLossSpike", severity="warning"),
                        # A fleet of hung runs in eu-1 does not silence a hung run in us-1.
                        {"alertname": "TrainingFleetHung", "severity": "critical", "cluster": "eu-1",
                         "namespace": "llm", "job": "training"},
                        dict(a, alertname="TrainingHung", severity="critical"),
                        dict(b, alertname="TrainingHung", severity="critical"))
            wait(lambda: len(webhook.firing_notifications()) >= 4, 30, "four notifications")
            time.sleep(5)  # past the fleet window (3 s) and group interval (2 s): nothing else may arrive
            got = sorted((n["group_labels"]["alertname"], n["group_labels"].get("cluster"))
                         for n in webhook.firing_notifications())
            with capsys.disabled():
                print(f"\ntwo clusters, one run name: {len(got)} notifications: {got}")
            assert got == [("TrainingDiverging", "eu-1"), ("TrainingFleetHung", "eu-1"),
                           ("TrainingHung", "us-1"), ("TrainingLossSpike", "us-1")]
            suppressed = {(x["labels"]["alertname"], x["labels"]["cluster"]) for x in am_alerts(am)
                          if x["status"]["state"] == "suppressed"}
            assert suppressed == {("TrainingLossSpike", "eu-1"), ("TrainingGradientExplosion", "eu-1"),
                                  ("TrainingHung", "eu-1")}
    finally:
        webhook.stop()


def test_local_config_follows_the_thresholds_it_is_given(tmp_path):
    path = alertmanager_config(tmp_path, "http://127.0.0.1:1", fast_thresholds(tmp_path))
    config = yaml.safe_load(path.read_text())
    fleet_route = next(r for r in config["route"]["routes"] if r["matchers"] == [alertmanager.FLEET_KINDS])
    assert fleet_route["group_wait"] == f"{FLEET_WINDOW}s"
    assert config["route"]["group_wait"] == "1s"


def test_promtool_fleet_watchdog_and_failed_notifications(tmp_path):
    """The shipped rules: the fleet alert fires for a scope with fleet_min_runs (5) hung runs, not for one with
    4; the Watchdog always fires; failed sends fire, a flat failure counter does not."""
    from exporter.ops.links import base_url
    from exporter.ops.thresholds import Thresholds
    from promtool import RULES_DIR, THRESHOLDS, alert_test, write_and_run

    t = Thresholds.load(THRESHOLDS)
    runbook, grafana = base_url(t, "links.runbook_url"), base_url(t, "links.grafana_url")
    hung = [{"series": f'ALERTS{{alertname="TrainingHung",alertstate="firing",cluster="{cluster}",job="training",'
                       f'namespace="llm",run="r{i}",severity="critical"}}', "values": "1x20"}
            for cluster, n in (("eu-1", 5), ("us-1", 4)) for i in range(n)]
    # One run firing an alert twice under two labels (as TrainingLossNotFinite's two causes can) is one run: us-1
    # stays at 4 runs, under the fleet minimum.
    hung.append({"series": 'ALERTS{alertname="TrainingHung",alertstate="firing",cluster="us-1",job="training",'
                           'namespace="llm",run="r0",severity="critical",cause="other"}', "values": "1x20"})
    failed = [{"series": 'alertmanager_notifications_failed_total{instance="am:9093",integration="slack",'
                         'job="alertmanager"}', "values": "0x5 1+1x10"},
              {"series": 'alertmanager_notifications_failed_total{instance="am:9093",integration="webhook",'
                         'job="alertmanager"}', "values": "0x15"}]
    fleet = {"exp_labels": {"alertname": "TrainingFleetHung", "severity": "critical", "cluster": "eu-1",
                            "namespace": "llm", "job": "training"},
             "exp_annotations": {
                 "summary": "Many training runs of one scope are hung at once: one cause, one incident.",
                 "description": "5 runs in cluster=eu-1 namespace=llm job=training fire TrainingHung (at least 5 "
                                "make a fleet incident); their per-run notifications are held back. Look for the "
                                "shared cause: storage, network, scheduler, a node pool, a bad data shard.",
                 "runbook_url": f"{runbook}#alert-name-trainingfleethung",
                 "dashboard_url": f"{grafana}/d/training-overview/training-overview?var-cluster=eu-1&var-namespace=llm&var-job=training"}}
    failing = {"exp_labels": {"alertname": "AlertmanagerNotificationsFailing", "severity": "critical",
                              "instance": "am:9093", "integration": "slack"},
               "exp_annotations": {
                   "summary": "Alertmanager fails to deliver notifications: alerts may reach nobody.",
                   "description": "Alertmanager am:9093 failed 5 slack notification attempts in the last 10m.",
                   "runbook_url": f"{runbook}#alert-name-alertmanagernotificationsfailing"}}
    watchdog = {"exp_labels": {"alertname": "Watchdog", "severity": "none"}, "exp_annotations": {
        "summary": "Always firing: the alerting pipeline works end to end.",
        "description": "This alert always fires. A dead man's switch that stops receiving it knows that "
                       "Prometheus, Alertmanager or the path between them is down.",
        "runbook_url": f"{runbook}#alert-name-watchdog"}}
    test = {"name": "fleet and pipeline", "interval": "1m", "input_series": hung + failed, "alert_rule_test": [
        alert_test(5, "TrainingFleetHung", fleet),
        alert_test(0, "Watchdog", watchdog),
        alert_test(4, "AlertmanagerNotificationsFailing"),
        alert_test(10, "AlertmanagerNotificationsFailing", failing),
    ]}
    result = write_and_run(tmp_path, [test], RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
