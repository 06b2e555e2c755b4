"""The Grafana dashboards: generated from one source, a model check of every panel and variable, the alerts'
thresholds of the thresholds file drawn, known metrics, no fixed datasource."""
import json
import re
from pathlib import Path

import pytest

from exporter.metrics import sample_names
from exporter.ops import dashboards, report, rules
from exporter.ops.links import base_url
from exporter.ops.panels import Selectors, all_panels, fill, regex_literal, run_panels, event_queries
from exporter.ops.thresholds import Thresholds

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "grafana" / "dashboards"
THRESHOLDS = ROOT / "deploy" / "prometheus" / "thresholds.yaml"
T = Thresholds.load(THRESHOLDS)
NAMES = ("training-run.json", "training-overview.json")
# Grafana unit ids the panels use; "suffix:<text>" is Grafana's custom unit.
UNITS = {"none", "s", "sci", "percentunit", "dateTimeFromNow"}


def load(name):
    return json.loads((BOARDS / name).read_text())


def panels(board):
    return [p for p in board["panels"] if p["type"] != "row"]


def by_title(board, title):
    return next(p for p in panels(board) if p["title"] == title)


def exprs(board):
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield annotation["name"], annotation["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["name"], variable["query"]


def test_committed_dashboards_equal_generated():
    rendered = dashboards.render(T)
    for name, text in rendered.items():
        assert (BOARDS / name).read_text() == text, f"{name} is stale: run `make dashboards`"
    assert sorted(p.name for p in BOARDS.glob("*.json")) == sorted(rendered)


@pytest.mark.parametrize("name, uid", [("training-run.json", "training-run"),
                                       ("training-overview.json", "training-overview")])
def test_stable_uid_and_datasource_from_a_variable(name, uid):
    board = load(name)
    assert board["uid"] == uid
    datasources = [p["datasource"] for p in panels(board)] + \
                  [v["datasource"] for v in board["templating"]["list"] if "datasource" in v] + \
                  [a["datasource"] for a in board["annotations"].get("list", []) if "expr" in a]
    assert datasources and all(ds == {"type": "prometheus", "uid": "${datasource}"} for ds in datasources)
    assert board["templating"]["list"][0]["type"] == "datasource"


def test_current_panel_types_only():
    for name in NAMES:
        assert {p["type"] for p in load(name)["panels"]} <= {"timeseries", "trend", "stat", "table", "row"}


def test_grid_has_no_overlaps_and_rows_in_order():
    for name in NAMES:
        cells = set()
        for p in load(name)["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not mine & cells, f"{name}: {p['title']} overlaps another panel"
            cells |= mine
    board = load("training-run.json")
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == [r.title for r in run_panels(T)]
    # The panel repeated per task metric is the last one: repeating it moves no other panel.
    assert board["panels"][-1].get("repeat") == "metric"
    assert [p for p in board["panels"] if p.get("repeat")] == [board["panels"][-1]]


def test_run_dashboard_variables_carry_the_identity_labels_and_open_on_the_latest_run():
    board = load("training-run.json")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "cluster", "namespace", "job", "run", "rank", "metric"]
    for name in ("cluster", "namespace", "job", "rank", "metric"):
        assert variables[name]["multi"] and variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    run = variables["run"]
    assert run["multi"] and not run.get("includeAll"), "the run variable must not default to every run"
    assert run["query"].startswith("query_result(sort_desc(") and run["sort"] == 0
    assert re.search(run["regex"].strip("/"), 'training_run_start_timestamp_seconds{run="r-1"} 1').group(1) == "r-1"
    # Every panel and annotation selects by every identity label.
    for where, expr in exprs(board):
        if where in ("cluster", "namespace", "job", "run"):
            continue
        for label in ("cluster", "namespace", "job"):
            assert f'{label}=~"${label}"' in expr, (where, label)


def test_identity_labels_come_from_the_thresholds_file(tmp_path):
    path = tmp_path / "thresholds.yaml"
    path.write_text(f"extends: {THRESHOLDS}\nidentity_labels: [job, run]\n")
    board = dashboards.run_dashboard(Thresholds.load(path))
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job", "run", "rank", "metric"]
    assert "cluster" not in json.dumps(board)


def test_run_dashboard_panels_are_the_specs():
    board = load("training-run.json")
    assert [p["title"] for p in panels(board)] == [s.title for s in all_panels(T)]


def test_every_graph_panel_model():
    """Colours by run name, gaps as gaps, shared tooltips, a known unit, each query's style."""
    board = load("training-run.json")
    assert board["graphTooltip"] == 2  # shared crosshair and tooltip
    for spec in all_panels(T):
        panel = by_title(board, spec.title)
        defaults = panel["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "none")
        assert unit in UNITS or unit.startswith("suffix:"), (spec.title, unit)
        if spec.kind not in ("timeseries", "by_step"):
            continue
        assert defaults["color"]["mode"] == "palette-classic-by-name", spec.title
        assert panel["options"]["tooltip"]["mode"] == "multi", spec.title
        overrides = {o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
                     for o in panel["fieldConfig"]["overrides"]}
        if spec.kind == "timeseries":
            assert defaults["custom"]["spanNulls"] is False, f"{spec.title} draws lines across gaps"
            for target, query in zip(panel["targets"], spec.queries):
                assert target["expr"] == query.expr and target["legendFormat"] == query.legend
                style = overrides.get(target["refId"], {})
                if query.style == "threshold":
                    assert style["custom.lineStyle"]["fill"] == "dash"
                elif query.style == "right":
                    assert style["custom.axisPlacement"] == "right" and style["unit"] not in (None, unit)
                elif query.style == "bars":
                    assert style["custom.drawStyle"] == "bars"
                else:
                    assert not style
        drawn = [s["value"] for s in defaults.get("thresholds", {}).get("steps", [])[1:]]
        wanted = sorted([level.value for level in spec.levels] + ([0.0] if spec.zero_line else []))
        assert drawn == pytest.approx(wanted), spec.title
        if wanted:
            assert defaults["custom"]["thresholdsStyle"]["mode"] == "dashed", spec.title
        if spec.log_scale:
            assert defaults["custom"]["scaleDistribution"] == {"type": "log", "log": 10}


def test_by_step_panels_pair_each_value_with_the_step_of_its_run():
    board = load("training-run.json")
    trends = [p for p in panels(board) if p["type"] == "trend"]
    assert [p["title"] for p in trends] == [s.title for s in all_panels(T) if s.kind == "by_step"]
    for panel in trends:
        refs = {t["refId"]: t for t in panel["targets"]}
        assert set(refs) == {"step", "value"}
        assert all(t["range"] and not t["instant"] and t["format"] == "table" for t in refs.values())
        assert refs["step"]["expr"].startswith("max by (run) (training_step{")
        assert refs["value"]["expr"].startswith("max by (run) (")
        ids = [tr["id"] for tr in panel["transformations"]]
        assert ids == ["merge", "organize", "groupingToMatrix", "convertFieldType", "sortBy"]
        opts = [tr["options"] for tr in panel["transformations"]]
        assert opts[1]["renameByName"] == {"Value #step": "step"}
        assert opts[2] == {"columnField": "run", "rowField": "step", "valueField": "Value #value", "emptyValue": "null"}
        x = panel["options"]["xField"]
        assert x == "step\\run"  # groupingToMatrix names its row column "<row>\<column>"
        assert opts[3]["conversions"] == [{"targetField": x, "destinationType": "number"}]
        assert opts[4]["sort"] == [{"field": x, "desc": False}]  # the trend panel needs an ascending x


def test_panels_draw_the_alerts_thresholds_of_the_thresholds_file():
    board = load("training-run.json")
    a = "alerts."
    factor = T.number(a + "TrainingGradientExplosion.factor")
    gradient = by_title(board, "Gradient norm")
    assert any(t["expr"].startswith(f"{factor:g} * run:training_grad_norm:baseline") for t in gradient["targets"])
    spike, sel = T.number(a + "TrainingLossSpike.sigmas"), Selectors(T).run
    assert any(t["expr"] == f"run:training_loss:smoothed{{{sel}}} + {spike:g} * run:training_loss:noise{{{sel}}}"
               for t in by_title(board, "Loss spikes")["targets"])
    size = by_title(board, "Spike size")["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert spike in [s["value"] for s in size]
    rise = by_title(board, "Rise above the best")
    assert rise["targets"][0]["expr"].startswith("run:training_loss:rise_sigmas")
    assert [s["value"] for s in rise["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]] == \
        pytest.approx([0, T.number(a + "TrainingDiverging.rise_sigmas")])
    improvement = by_title(board, "Improvement per window")
    assert [s["value"] for s in improvement["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]] == pytest.approx(
        [T.number(a + "TrainingPlateau.improvement_sigmas"),
         T.number(a + "TrainingLossDecreasingSlowly.improvement_sigmas")])
    hung = by_title(board, "Since last step")
    assert hung["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == T.seconds(a + "TrainingHung.floor")


def test_header_stats_read_the_whole_time_range_and_alerts_link_their_runbook():
    board = load("training-run.json")
    for spec in next(r for r in run_panels(T) if r.title == "Run").panels:
        panel = by_title(board, spec.title)
        assert all(t["instant"] for t in panel["targets"]), spec.title
        if panel["type"] == "stat":
            assert panel["options"]["reduceOptions"]["calcs"] == ["lastNotNull"]
            assert "[$__range]" in panel["targets"][0]["expr"], spec.title
    alerts = by_title(board, "Firing alerts")
    expr = alerts["targets"][0]["expr"]
    for name in rules.SEVERITY:
        assert f'"{base_url(T, "links.runbook_url")}#alert-name-{name.lower()}", "alertname", "{name}"' in expr
    links = {o["matcher"]["options"]: o["properties"] for o in alerts["fieldConfig"]["overrides"]}
    assert links["alertname"][0]["value"][0]["url"] == "${__data.fields.runbook}"


def test_annotations_for_events_and_alerts_by_severity():
    board = load("training-run.json")
    annotations = {a["name"]: a for a in board["annotations"]["list"] if "expr" in a}
    assert {"Evaluations", "Epochs", "Restarts and resumes", "Non-finite steps"} <= set(annotations)
    severities = {a["expr"].split('severity="')[1].split('"')[0]: a["iconColor"]
                  for a in annotations.values() if a["expr"].startswith("ALERTS")}
    # Every severity a run's alert can have; "none" is the Watchdog's, which concerns no run.
    assert set(severities) == (set(rules.SEVERITY.values()) - {"none"}) | {"critical", "warning", "info"}
    assert len(set(severities.values())) == len(severities), "one colour per severity"


def test_dashboards_link_each_other_and_the_runbook():
    for name, other in (("training-run.json", "training-overview"), ("training-overview.json", "training-run")):
        links = load(name)["links"]
        assert links[0]["url"] == f"/d/{other}" and links[0]["keepTime"] and links[0]["includeVars"]
        assert links[1]["url"] == base_url(T, "links.runbook_url")


def test_overview_lists_runs_of_the_whole_range_and_links_them_with_their_time_range():
    board = load("training-overview.json")
    for panel in panels(board):
        for target in panel["targets"]:
            assert target["instant"], (panel["title"], target["expr"])
    for title in ("Runs", "Run comparison"):
        table = by_title(board, title)
        refs = {t["refId"] for t in table["targets"]}
        assert all("$__range" in t["expr"] or t["refId"] == "alerts" for t in table["targets"]), title
        organize = table["transformations"][1]["options"]
        columns = set(organize["renameByName"].values())
        overrides = {o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
                     for o in table["fieldConfig"]["overrides"]}
        url = overrides["Run"]["links"][0]["url"]
        assert url.startswith("/d/training-run/training-run?${datasource:queryparam}&${cluster:queryparam}"
                              "&${namespace:queryparam}&var-job=${__data.fields.job}&var-run=${__value.raw}")
        for field in re.findall(r"\$\{__data\.fields\.(\w+)\}", url):
            assert field in columns | {"job"}, (title, field)
        assert overrides["start_ms"]["custom.hidden"] and overrides["end_ms"]["custom.hidden"]
        assert "status" in refs and {"Status", "Run"} <= columns
    comparison = by_title(board, "Run comparison")
    assert any(t["expr"].startswith("max without (instance, rank, local_rank, host) (last_over_time(training_run_info")
               for t in comparison["targets"])
    assert {"Best val loss", "Final train loss", "Steps/s", "Duration"} <= set(
        comparison["transformations"][1]["options"]["renameByName"].values())
    running = by_title(board, "Running")["targets"][0]["expr"]
    assert running.endswith(" or vector(0)")


def test_dashboards_name_only_defined_metrics():
    recorded = rules.recorded(T)
    known = sample_names() | recorded | {"ALERTS", "up"}
    for name in NAMES:
        for where, expr in exprs(load(name)):
            names = set(re.findall(r"[a-zA-Z_:]*training_[a-z_:]*|ALERTS", expr))
            assert names, (where, expr)
            assert names <= known, (where, names - known)
    for expr in event_queries(T).values():
        assert set(re.findall(r"[a-zA-Z_:]*training_[a-z_:]*", expr)) <= known


def test_report_pairs_each_value_with_the_step_of_the_same_instant():
    x, y = report.by_step([(0.0, 10), (2.0, 20), (4.0, 30)], [(2.0, 0.5), (4.0, 0.4), (6.0, 0.3)])
    assert list(x) == [20, 30] and list(y) == [0.5, 0.4]


def test_variables_filled_for_one_run_match_only_that_run():
    run = 'lr3e-4.v2"x'
    filled = fill('m{job=~"$job", run=~"$run"}[$__range] $other', {"job": "training", "run": regex_literal(run),
                                                                   "__range": "5m"})
    assert filled == 'm{job=~"training", run=~"lr3e-4\\\\.v2\\"x"}[5m] $other'
    pattern = filled.split('run=~"')[1].split('"}')[0].replace('\\"', '"').replace("\\\\", "\\")
    assert re.fullmatch(pattern, run) and not re.fullmatch(pattern, "lr3e-4Xv2\"x")
