"""The Grafana dashboards: generated from one source, current panel types, known metrics, no fixed datasource."""
import json
import re
from pathlib import Path

import pytest

from exporter.ops import dashboards, rules
from exporter.ops.thresholds import Thresholds, ThresholdsError, duration_seconds
from exporter.metrics import sample_names
from exporter.ops.panels import run_panels

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "grafana" / "dashboards"
THRESHOLDS = ROOT / "deploy" / "prometheus" / "thresholds.yaml"


def load(name):
    return json.loads((BOARDS / name).read_text())


def all_panels(board):
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exprs(board):
    for panel in all_panels(board):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield annotation["name"], annotation["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["name"], variable["query"]


def test_committed_dashboards_equal_generated():
    rendered = dashboards.render(Thresholds.load(THRESHOLDS))
    for name, text in rendered.items():
        assert (BOARDS / name).read_text() == text, f"{name} is stale: run `make dashboards`"
    assert sorted(p.name for p in BOARDS.glob("*.json")) == sorted(rendered)


@pytest.mark.parametrize("name, uid", [("training-run.json", "training-run"),
                                       ("training-overview.json", "training-overview")])
def test_stable_uid_and_datasource_from_a_variable(name, uid):
    board = load(name)
    assert board["uid"] == uid
    datasources = [p["datasource"] for p in all_panels(board)] + \
                  [v["datasource"] for v in board["templating"]["list"] if "datasource" in v]
    assert datasources and all(ds == {"type": "prometheus", "uid": "${datasource}"} for ds in datasources)
    assert board["templating"]["list"][0]["type"] == "datasource"


def test_current_panel_types_only():
    for name in ("training-run.json", "training-overview.json"):
        assert {p["type"] for p in all_panels(load(name))} <= {"timeseries", "stat", "table", "row"}


def test_run_dashboard_has_the_variables_and_panels_of_the_issue():
    board = load("training-run.json")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "job", "run", "rank", "metric"}
    assert variables["run"]["multi"] and variables["rank"]["includeAll"]
    titles = [p["title"] for p in all_panels(board)]
    assert titles == [spec.title for spec in run_panels(10)]
    repeated = next(p for p in all_panels(board) if p.get("repeat"))
    assert repeated["repeat"] == "metric"
    assert board["annotations"]["list"][0]["expr"].startswith("ALERTS{")


def test_gradient_panel_draws_the_explosion_threshold_of_the_thresholds_file():
    factor = Thresholds.load(THRESHOLDS).number("alerts.TrainingGradientExplosion.factor")
    panel = next(p for p in load("training-run.json")["panels"] if p["title"] == "Gradient norm")
    assert any(t["expr"].startswith(f"{factor:g} * run:training_grad_norm:baseline") for t in panel["targets"])


def test_dashboards_name_only_defined_metrics():
    recorded = {r["record"] for r in rules.recording_rules(Thresholds.load(THRESHOLDS))}
    known = sample_names() | recorded | {"ALERTS", "up"}
    for name in ("training-run.json", "training-overview.json"):
        for where, expr in exprs(load(name)):
            names = set(re.findall(r"[a-zA-Z_:]*training_[a-z_:]*|ALERTS", expr))
            assert names, (where, expr)
            assert names <= known, (where, names - known)
