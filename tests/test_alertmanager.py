"""Alertmanager configuration, chat templates and runbook anchors."""
import re
import subprocess
from pathlib import Path

import yaml

from exporter.ops import rules
from exporter.stack.servers import DEPLOY, alertmanager_config, binary

CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
TEMPLATES = str(DEPLOY / "alertmanager" / "templates" / "*.tmpl")
DATA = Path(__file__).resolve().parent / "data" / "notification.json"


def amtool(*args):
    return subprocess.run([binary("amtool"), *args], capture_output=True, text=True)


def test_amtool_check_config_is_clean():
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_stack_variant_is_valid_too(tmp_path):
    path = alertmanager_config(tmp_path, "http://127.0.0.1:1")
    result = amtool("check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    assert config["inhibit_rules"] == yaml.safe_load(CONFIG.read_text())["inhibit_rules"]


def route(labels):
    result = amtool("config", "routes", "test", f"--config.file={CONFIG}",
                    *[f"{k}={v}" for k, v in labels.items()])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_routes_by_severity():
    assert route({"alertname": "TrainingLossNotFinite", "run": "r", "severity": "critical"}) == "training-critical"
    assert route({"alertname": "TrainingLossSpike", "run": "r", "severity": "warning"}) == "training-warning"
    assert route({"alertname": "TrainingPlateau", "run": "r", "severity": "info"}) == "training-quiet"


def test_grouped_by_alert_and_run_with_the_inhibitions_of_the_contract():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["route"]["group_by"] == ["alertname", "run"]
    inhibit = {(r["source_matchers"][0], r["target_matchers"][0]): r["equal"] for r in config["inhibit_rules"]}
    nan = 'alertname="TrainingLossNotFinite"'
    targets = next(t for (s, t) in inhibit if s == nan)
    for silenced in ("TrainingLossSpike", "TrainingGradientExplosion", "TrainingDiverging"):
        assert silenced in targets
    hung = next(t for (s, t) in inhibit if "TrainingHung" in s and "TrainingTargetDown" in s)
    assert "TrainingPlateau" in hung
    assert all(equal == ["run"] for equal in inhibit.values())


def render(template):
    result = amtool("template", "render", f"--template.glob={TEMPLATES}", f"--template.data={DATA}",
                    f"--template.text={{{{ template \"{template}\" . }}}}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_chat_title_names_alert_and_run():
    assert render("training.chat.title").strip() == "[FIRING:1] TrainingLossNotFinite · run bert-large-lr1e-3"


def test_chat_text_reads_well():
    text = render("training.chat.text")
    assert text.splitlines() == [
        "*CRITICAL* Training loss or gradients became NaN or infinite.",
        "Run bert-large-lr1e-3 had 3 steps with a NaN/Inf loss or gradients (or skipped by its gradient scaler, "
        "more than 50% of steps) in the last 5m.",
        "Run: `bert-large-lr1e-3` · since 2026-11-26 10:15:00 UTC",
        "Runbook: deploy/runbook.md#alert-name-traininglossnotfinite",
    ]


def github_anchor(heading):
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def test_every_alert_has_its_runbook_section():
    runbook = (DEPLOY / "runbook.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^## (.+)$", runbook, re.M)}
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "rules" / rules.ALERTS_FILE).read_text())["groups"][0]["rules"]
    for alert in alerts:
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, alert["alert"]
    assert len(anchors) == len(alerts)
