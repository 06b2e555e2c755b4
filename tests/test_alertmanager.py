"""Alertmanager configuration: routing follows the thresholds file, every alert reaches a receiver that notifies,
secrets are checked before start-up, failed sends alert elsewhere, the compose receivers work as written."""
import json
import re
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest
import yaml

from exporter.ops import alertmanager, rules
from exporter.ops.thresholds import Thresholds
from exporter.stack.servers import (DEPLOY, REPO, Alertmanager, ManagedProcess, Prometheus, WebhookReceiver,
                                    alertmanager_config, binary, free_port, prometheus_config)
from test_fleet import am_alerts, fast_thresholds, post_alerts, wait

CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
THRESHOLDS = DEPLOY / "prometheus" / "thresholds.yaml"
TEMPLATES = str(DEPLOY / "alertmanager" / "templates" / "*.tmpl")
DATA = REPO / "tests" / "data" / "notification.json"
MOUNT = f"/etc/alertmanager={DEPLOY / 'alertmanager'}"


def amtool(*args):
    return subprocess.run([binary("amtool"), *args], capture_output=True, text=True)


def shipped():
    return yaml.safe_load(CONFIG.read_text())


def test_amtool_check_config_is_clean():
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_stack_variant_is_valid_too(tmp_path):
    path = alertmanager_config(tmp_path, "http://127.0.0.1:1")
    result = amtool("check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    assert config["inhibit_rules"] == shipped()["inhibit_rules"]
    assert config["route"]["group_by"] == shipped()["route"]["group_by"]


def test_grouping_and_every_inhibition_follow_the_identity_labels():
    t = Thresholds.load(THRESHOLDS)
    identity = [x.strip() for x in t.identity.split(",")]
    config = shipped()
    assert {k: config[k] for k in ("route", "inhibit_rules")} == alertmanager.routing(t)
    assert config["route"]["group_by"] == ["alertname", *identity]
    for rule in config["inhibit_rules"]:
        fleet = rule["source_matchers"][0].startswith('alertname="TrainingFleet')
        assert rule["equal"] == ([x for x in identity if x != "run"] if fleet else identity), rule


def test_a_routing_that_differs_from_the_thresholds_is_reported(tmp_path):
    other = tmp_path / "thresholds.yaml"
    other.write_text(yaml.safe_dump({"extends": str(THRESHOLDS), "identity_labels": ["site", "run"]}))
    found = alertmanager.problems(CONFIG, Thresholds.load(other), [("/etc/alertmanager", DEPLOY / "alertmanager")])
    assert [p.split(" ", 1)[0] for p in found if not p.startswith("secret")] == ["route", "inhibit_rules"]
    assert "- site" in found[0]


def route(labels):
    result = amtool("config", "routes", "test", f"--config.file={CONFIG}",
                    *[f"{k}={v}" for k, v in labels.items()])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def generated_alerts():
    return [rule for group in yaml.safe_load((DEPLOY / "prometheus" / "rules" / rules.ALERTS_FILE).read_text())
            ["groups"] for rule in group["rules"] if "alert" in rule]


EXPECTED_RECEIVER = {"critical": "training-critical", "warning": "training-warning", "info": "training-quiet"}
SPECIAL_RECEIVER = {"Watchdog": "watchdog", "AlertmanagerNotificationsFailing": "alerting-health"}


def test_amtool_routes_every_alert_and_severity(capsys):
    run = {"cluster": "eu-1", "namespace": "llm", "job": "training", "run": "r"}
    table = []
    for alert in generated_alerts():
        severity = alert["labels"]["severity"]
        want = SPECIAL_RECEIVER.get(alert["alert"]) or EXPECTED_RECEIVER[severity]
        got = route({"alertname": alert["alert"], "severity": severity, **run})
        table.append((alert["alert"], severity, got))
        assert got == want, alert["alert"]
    # Every severity, and one nobody configured, on an alert of another source.
    for severity, want in {**EXPECTED_RECEIVER, "page": "training-unrouted", "": "training-unrouted"}.items():
        labels = {"alertname": "SomeoneElsesAlert", **run, **({"severity": severity} if severity else {})}
        got = route(labels)
        table.append(("SomeoneElsesAlert", severity or "(none)", got))
        assert got == want, severity
    with capsys.disabled():
        print("\n| alert | severity | receiver |\n| --- | --- | --- |")
        for row in table:
            print("| " + " | ".join(row) + " |")


def test_every_receiver_but_the_info_one_notifies():
    receivers = {r["name"]: r for r in shipped()["receivers"]}
    assert set(receivers) == {*EXPECTED_RECEIVER.values(), *SPECIAL_RECEIVER.values(), "training-unrouted"}
    for name, receiver in receivers.items():
        assert (len(receiver) > 1) == (name != "training-quiet"), name
    assert shipped()["route"]["receiver"] == "training-unrouted"


def render(template):
    result = amtool("template", "render", f"--template.glob={TEMPLATES}", f"--template.data={DATA}",
                    f"--template.text={{{{ template \"{template}\" . }}}}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_chat_title_names_alert_and_run():
    assert render("training.chat.title").strip() == "[FIRING:1] TrainingLossNotFinite · run bert-large-lr1e-3"


def test_chat_text_reads_well_with_absolute_links():
    text = render("training.chat.text")
    assert text.splitlines() == [
        "*CRITICAL* Training loss or gradients became NaN or infinite.",
        "Run bert-large-lr1e-3 had 3 steps with a NaN/Inf loss or gradients (or skipped by its gradient scaler, "
        "more than 50% of steps) in the last 5m.",
        "Run: `bert-large-lr1e-3` · since 2026-11-26 10:15:00 UTC",
        "Runbook: https://github.com/example-org/training-exporter/blob/main/deploy/runbook.md"
        "#alert-name-traininglossnotfinite",
        "Dashboard: http://localhost:3000/d/training-run/training-run?var-cluster=&var-namespace=&var-job=training&var-run=bert-large-lr1e-3",
    ]


def test_links_are_absolute_and_a_relative_base_is_refused(tmp_path):
    for alert in generated_alerts():
        for key in ("runbook_url", "dashboard_url"):
            if key in alert["annotations"]:
                assert urlsplit(alert["annotations"][key]).scheme in ("http", "https"), (alert["alert"], key)
    relative = tmp_path / "thresholds.yaml"
    relative.write_text(yaml.safe_dump({"extends": str(THRESHOLDS), "links": {"runbook_url": "deploy/runbook.md"}}))
    with pytest.raises(ValueError, match="links.runbook_url must be an absolute"):
        rules.alerting_rules(Thresholds.load(relative))


def github_anchor(heading):
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def test_every_alert_has_its_runbook_section():
    runbook = (DEPLOY / "runbook.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^## (.+)$", runbook, re.M)}
    alerts = generated_alerts()
    for alert in alerts:
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, alert["alert"]
    assert len(anchors) == len(alerts)


def check_cli(config, *mounts):
    return subprocess.run([sys.executable, "-m", "exporter", "check-alertmanager", "--config", str(config),
                           "--thresholds", str(THRESHOLDS), *[f"--mount={m}" for m in mounts]],
                          capture_output=True, text=True, cwd=REPO)


def test_startup_check_fails_on_a_missing_secret_file_and_passes_once_it_exists(tmp_path, capsys):
    config = tmp_path / "alertmanager.yml"
    config.write_text(CONFIG.read_text())
    missing = check_cli(config, f"/etc/alertmanager={tmp_path}")
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert f"secret file /etc/alertmanager/secrets/slack-webhook-url is missing or empty (looked at " \
           f"{tmp_path}/secrets/slack-webhook-url)" in missing.stdout
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "slack-webhook-url").write_text("https://hooks.slack.com/services/T0/B0/x\n")
    # In process from here: the command line is the same function.
    assert alertmanager.main(config, THRESHOLDS, [f"/etc/alertmanager={tmp_path}"]) == 0
    assert "1 secret file(s) present" in capsys.readouterr().out


def test_the_shipped_routing_passes_the_startup_check_but_for_the_secret_it_cannot_ship():
    found = alertmanager.problems(CONFIG, Thresholds.load(THRESHOLDS), [("/etc/alertmanager", DEPLOY / "alertmanager")])
    assert len(found) == 1 and found[0].startswith("secret file /etc/alertmanager/secrets/slack-webhook-url "), found


@pytest.mark.e2e
def test_a_failing_receiver_fires_the_failure_alert_to_another_receiver(tmp_path, capsys):
    thresholds = fast_thresholds(tmp_path)
    webhook = WebhookReceiver()
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    config_path = alertmanager_config(tmp_path / "am", webhook.url, thresholds)
    config = yaml.safe_load(config_path.read_text())
    next(r for r in config["receivers"] if r["name"] == "training-critical")["webhook_configs"][0]["url"] = dead
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    am = prom = None
    try:
        am = Alertmanager(config_path, tmp_path / "am")
        rules.write(thresholds, tmp_path / "rules")
        port = free_port()
        prom = Prometheus(prometheus_config(tmp_path / "prom", [], tmp_path / "rules", f"127.0.0.1:{am.port}", port,
                                            extra_targets={"alertmanager": [f"127.0.0.1:{am.port}"]}),
                          tmp_path / "prom", port=port)
        am.wait_ready()
        prom.wait_ready()
        prom.wait_for('alertmanager_notifications_failed_total{job="alertmanager",integration="webhook"} == 0')
        post_alerts(am, {"alertname": "TrainingDiverging", "severity": "critical", "cluster": "eu-1",
                         "namespace": "llm", "job": "training", "run": "r"})
        wait(lambda: webhook.firing_notifications("alerting-health"), 60, "the failure alert at alerting-health")
        time.sleep(3)
        health = webhook.firing_notifications("alerting-health")
        with capsys.disabled():
            print(f"\nfailing receiver: {len(health)} notification(s) at alerting-health "
                  f"{[n['group_labels'] for n in health]}; delivered by the failing receiver: 0")
        assert [n["group_labels"] for n in health] == [
            {"alertname": "AlertmanagerNotificationsFailing", "instance": f"127.0.0.1:{am.port}",
             "integration": "webhook"}]
        assert webhook.firing_notifications("training-critical") == []
        assert am_alerts(am, alertname="TrainingDiverging")
    finally:
        for server in (prom, am):
            if server is not None:
                server.stop()
        webhook.stop()


def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def service_ports(service):
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("expose", []) + service.get("ports", [])}


def test_every_alertmanager_url_names_a_compose_service_and_its_port():
    services = compose()["services"]
    urls = [c["url"] for r in shipped()["receivers"] for c in r.get("webhook_configs", [])]
    assert urls
    for url in urls:
        parts = urlsplit(url)
        assert parts.hostname in services, url
        assert parts.port in service_ports(services[parts.hostname]), url
    # And Alertmanager mounts the configuration it is checked against.
    assert "./deploy/alertmanager:/etc/alertmanager:ro" in services["alertmanager"]["volumes"]


def local_command(service):
    """The compose service's command, run here: mounted files mapped back into the repository."""
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", []) if v.startswith("./")}
    args = [str(REPO / mounts[a]) if a in mounts else a for a in service["command"]]
    assert args[0] == "python"
    return [sys.executable, *args[1:]]


@pytest.mark.e2e
def test_the_compose_receiver_run_on_loopback_gets_real_notifications(tmp_path, capsys):
    services = compose()["services"]
    config = shipped()
    hosts = {urlsplit(c["url"]).hostname for r in config["receivers"] for c in r.get("webhook_configs", [])}
    assert len(hosts) == 1
    (name,) = hosts
    port = free_port()
    receiver = ManagedProcess(local_command(services[name]) + ["--host", "127.0.0.1", "--port", str(port)],
                              tmp_path / "receiver.log")
    # The shipped configuration, the compose host name pointing at this loopback port, no Slack (no secret here),
    # second-scale waits.
    for r in config["receivers"]:
        r.pop("slack_configs", None)
        for c in r.get("webhook_configs", []):
            c["url"] = c["url"].replace(f"//{name}:{urlsplit(c['url']).port}", f"//127.0.0.1:{port}")
    config["templates"] = [str(DEPLOY / "alertmanager" / t) for t in config["templates"]]
    config["route"]["group_wait"] = "1s"
    for r in config["route"]["routes"]:
        if "group_wait" in r:
            r["group_wait"] = "1s"
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        with Alertmanager(path, tmp_path / "am") as am:
            am.wait_ready()
            run = {"cluster": "eu-1", "namespace": "llm", "job": "training"}
            post_alerts(am, {"alertname": "TrainingLossNotFinite", "severity": "critical", "run": "a", **run},
                        {"alertname": "TrainingLossSpike", "severity": "warning", "run": "b", **run},
                        {"alertname": "TrainingPlateau", "severity": "info", "run": "c", **run},
                        {"alertname": "SomeoneElsesAlert", "run": "d", **run},
                        {"alertname": "Watchdog", "severity": "none"})

            def lines():
                complete = receiver.log_path.read_text().rpartition("\n")[0]
                return [json.loads(x) for x in complete.splitlines() if x.startswith("{")]

            wait(lambda: len(lines()) >= 4, 30, f"four notifications at the compose receiver: {receiver.log_tail()}")
            time.sleep(3)
            got = sorted((x["receiver"], x["labels"]["alertname"]) for x in lines() if x["status"] == "firing")
            with capsys.disabled():
                print(f"\ncompose receiver `{name}` on loopback: {len(got)} notifications: {got}")
            assert got == [("training/critical", "TrainingLossNotFinite"), ("training/unrouted", "SomeoneElsesAlert"),
                           ("training/warning", "TrainingLossSpike"), ("watchdog", "Watchdog")]
    finally:
        receiver.stop()
