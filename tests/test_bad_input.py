"""Malformed thresholds files: every command that reads one exits non-zero with one line naming the key."""
from pathlib import Path

import pytest
import yaml

from exporter.__main__ import main
from exporter.ops.thresholds import SHIPPED, Thresholds, ThresholdsError, check_schema


def _edit(data, key, value=None, delete=False):
    *path, last = key.split(".")
    node = data
    for part in path:
        node = node[part]
    if delete:
        del node[last]
    else:
        node[last] = value


MALFORMED = [
    # (edit, the key and problem the one line must name)
    (lambda d: _edit(d, "alerts.TrainingLossSpike.sigmaz", 3), "unknown key 'alerts.TrainingLossSpike.sigmaz'"),
    (lambda d: _edit(d, "aletrs", {}), "unknown key 'aletrs'"),
    (lambda d: _edit(d, "windows.trend", "30 minutes"), "windows.trend: '30 minutes' is not a Prometheus duration"),
    (lambda d: _edit(d, "alerts.TrainingHung.for", 15), "alerts.TrainingHung.for: 15 is not a Prometheus duration"),
    (lambda d: _edit(d, "alerts.TrainingGradientExplosion.factor", -10),
     "alerts.TrainingGradientExplosion.factor must be a positive number, got -10"),
    (lambda d: _edit(d, "alerts.TrainingLossSpike.sigmas", "3"),
     "alerts.TrainingLossSpike.sigmas must be a positive number, got '3'"),
    (lambda d: _edit(d, "windows", None, delete=True), "missing key 'windows'"),
    (lambda d: _edit(d, "alerts.TrainingHung", None, delete=True), "missing key 'alerts.TrainingHung'"),
    (lambda d: _edit(d, "alerts", ["TrainingHung"]), "alerts must be a section"),
    (lambda d: _edit(d, "identity_labels", "run"), "identity_labels must be a list of names"),
]


def _commands(path: Path, out: Path):
    return {
        "rules": ["rules", "--thresholds", str(path), "--out", str(out)],
        "dashboards": ["dashboards", "--thresholds", str(path), "--out", str(out)],
        # Nothing listens there: the thresholds are read, and refused, before Prometheus is asked.
        "report": ["report", "--thresholds", str(path), "--prometheus", "http://127.0.0.1:9", "--run", "r",
                   "--out", str(out)],
    }


@pytest.mark.parametrize("edit, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_thresholds_give_one_line_naming_the_key(tmp_path, capsys, edit, message):
    data = yaml.safe_load(SHIPPED.read_text())
    edit(data)
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(data))
    for command, argv in _commands(path, tmp_path / "out").items():
        assert main(argv) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (command, err)
    assert not list(tmp_path.glob("out/**/*.*"))  # nothing half-written


def test_not_yaml_and_missing_file_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("alerts: [\n  - {\n")
    for name, problem in (("bad.yaml", "not valid YAML"), ("absent.yaml", "cannot read")):
        assert main(["rules", "--thresholds", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and problem in err and name in err


def test_extends_file_is_checked_after_merging(tmp_path, capsys):
    (tmp_path / "fast.yaml").write_text(f"extends: {SHIPPED}\nalerts:\n  TrainingHung: {{floor: 10s, fro: 2s}}\n")
    assert main(["rules", "--thresholds", str(tmp_path / "fast.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key 'alerts.TrainingHung.fro'" in capsys.readouterr().err


def test_the_schema_is_whatever_the_shipped_file_holds():
    """A key another change adds to the shipped file is known, and required, with the kind of its value."""
    schema = yaml.safe_load(SHIPPED.read_text())
    schema["alerts"]["TrainingHung"]["grace"] = "1h"
    data = yaml.safe_load(SHIPPED.read_text())
    with pytest.raises(ThresholdsError, match="missing key 'alerts.TrainingHung.grace'"):
        check_schema(data, schema, "t")
    data["alerts"]["TrainingHung"]["grace"] = "soon"
    with pytest.raises(ThresholdsError, match="alerts.TrainingHung.grace: 'soon' is not a Prometheus duration"):
        check_schema(data, schema, "t")
    data["alerts"]["TrainingHung"]["grace"] = "2h"
    check_schema(data, schema, "t")


def test_shipped_files_pass():
    for name in ("thresholds.yaml", "thresholds-demo.yaml"):
        assert Thresholds.load(SHIPPED.parent / name).seconds("alerts.TrainingHung.floor") > 0


def test_phase_allowances_take_the_users_own_phase_names(tmp_path):
    """Phases are the loop's own names: any is known, and each allowance must still be a duration."""
    path = tmp_path / "phases.yaml"
    path.write_text(f"extends: {SHIPPED}\nalerts:\n  TrainingHung: {{phases: {{data_reload: 30m}}}}\n")
    assert Thresholds.load(path).seconds("alerts.TrainingHung.phases.data_reload") == 1800
    path.write_text(f"extends: {SHIPPED}\nalerts:\n  TrainingHung: {{phases: {{data_reload: soon}}}}\n")
    with pytest.raises(ThresholdsError, match="alerts.TrainingHung.phases.data_reload: 'soon' is not"):
        Thresholds.load(path)
