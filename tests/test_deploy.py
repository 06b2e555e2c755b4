"""Deployment files: compose, Prometheus configuration, Kubernetes manifests agree with each other and the rules."""
import subprocess
from pathlib import Path

import yaml

from exporter.ops import rules
from exporter.ops.thresholds import Thresholds
from exporter.stack.servers import binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
THRESHOLDS = DEPLOY / "prometheus" / "thresholds.yaml"


def test_compose_file_is_valid():
    result = subprocess.run([binary("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_compose_mounts_exist_in_the_repository():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def test_prometheus_config_is_valid_and_scrapes_the_rules_job():
    config = DEPLOY / "prometheus" / "prometheus.yml"
    result = subprocess.run([binary("promtool"), "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = [j["job_name"] for j in yaml.safe_load(config.read_text())["scrape_configs"]]
    assert "training" in jobs
    assert Thresholds.load(THRESHOLDS).text("selector") == 'job="training"'


def test_prometheusrule_manifest_is_the_generated_rules():
    path = DEPLOY / "kubernetes" / "prometheusrule.yaml"
    assert path.read_text() == rules.render_prometheus_rule(Thresholds.load(THRESHOLDS))
    groups = yaml.safe_load(path.read_text())["spec"]["groups"]
    files = [group for name in (rules.RECORDING_FILE, rules.ALERTS_FILE)
             for group in yaml.safe_load((DEPLOY / "prometheus" / "rules" / name).read_text())["groups"]]
    assert groups == files


def test_podmonitor_scrapes_the_example_job_as_job_training():
    monitor = yaml.safe_load((DEPLOY / "kubernetes" / "podmonitor.yaml").read_text())
    job, _service = yaml.safe_load_all((DEPLOY / "kubernetes" / "training-job.yaml").read_text())
    pod = job["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == set(ports)
    assert sorted(ports.values()) == [9945, 9946]
    for endpoint in endpoints:
        assert {"action": "replace", "targetLabel": "job", "replacement": "training"} in endpoint["relabelings"]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["KUBERNETES_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"
