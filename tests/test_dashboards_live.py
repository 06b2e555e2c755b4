"""Every dashboard query on a real Prometheus holding real runs' data; the PNG report drawn from it."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.ops import report
from exporter.ops.panels import run_panels

pytestmark = pytest.mark.e2e
BOARDS = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
RUNS = "demo-overfit|demo-healthy"
VARIABLES = {"$job": "training", "$run": RUNS, "$rank": ".*", "$metric": "mse", "$__rate_interval": "10s"}


def fill(expr):
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def board_queries(name):
    board = json.loads((BOARDS / name).read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("instant", False)
    for annotation in board.get("annotations", {}).get("list", []):
        yield annotation["name"], annotation["expr"], False


@pytest.mark.parametrize("name", ["training-run.json", "training-overview.json"])
def test_every_panel_query_runs_and_returns_data(showcase, name):
    prom = showcase.stack.prometheus
    end = time.time()
    empty = []
    for title, expr, instant in board_queries(name):
        query = fill(expr)
        result = prom.query(query) if instant else prom.query_range(query, showcase.started, end, 2)
        if not result:
            empty.append((title, query))
    assert empty == []


@pytest.mark.parametrize("name", ["training-run.json", "training-overview.json"])
def test_variable_queries_list_the_runs(showcase, name):
    board = json.loads((BOARDS / name).read_text())
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]).groups()
        values = showcase.stack.prometheus.api(f"label/{label}/values", **{"match[]": fill(match)})
        assert values, variable["name"]
        if label == "run":
            assert "demo-overfit" in values


def test_report_png_is_drawn_from_real_data(showcase, tmp_path):
    prom = showcase.stack.prometheus
    end = time.time()
    since = end - showcase.started
    path = report.main(prom.url, "demo-overfit", out=tmp_path, since=since, end=end, job="training")
    assert path == tmp_path / "demo-overfit.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
    assert pixels.std() > 0.05  # curves, not a blank canvas

    panels = report.fetch(prom, "demo-overfit", start=end - since, end=end, job="training")
    assert set(panels) == {s.title for s in run_panels(10) if s.in_report}
    curves = {line.label: line for line in panels["Learning curves"]}
    assert set(curves) == {"demo-overfit train", "demo-overfit val"}
    # The x-axis is the optimizer step, not time: it ends at the run's last step.
    last_step = prom.query('max(training_step{run="demo-overfit"})')[0]["value"]
    assert curves["demo-overfit train"].x.max() == pytest.approx(last_step, rel=0.02)
    # The curves are Prometheus's values: overfitting shows as a rising val loss over a falling train loss.
    val = curves["demo-overfit val"].y
    train = curves["demo-overfit train"].y
    assert val[-1] > val[np.nanargmin(val)] * 1.25
    finite = train[np.isfinite(train)]
    assert finite[-1] < finite[0]
