"""Every dashboard query and variable on a real Prometheus holding real runs' data; what the panels show of the
demo's pathologies; the PNG report drawn from it."""
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from exporter.ops import report
from exporter.ops.panels import all_panels, fill
from exporter.ops.thresholds import Thresholds

pytestmark = pytest.mark.e2e
BOARDS = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
# Event annotations no demo run produces: checked to run, not to return data.
NO_DEMO_EVENT = {"Restarts and resumes"}


def variables(showcase, end, run=".*"):
    return {"cluster": ".*", "namespace": ".*", "job": "training", "run": run, "rank": ".*", "metric": "mse",
            "__range": f"{int(end - showcase.started) + 1}s", "__interval": "2s", "__rate_interval": "8s"}


def board(name):
    return json.loads((BOARDS / name).read_text())


def board_queries(doc):
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("instant", False)
    for annotation in doc.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield annotation["name"], annotation["expr"], False


@pytest.mark.parametrize("name", ["training-run.json", "training-overview.json"])
def test_every_panel_and_annotation_query_runs_and_returns_data(showcase, name):
    prom = showcase.stack.prometheus
    end = time.time()
    values = variables(showcase, end)
    empty = []
    for title, expr, instant in board_queries(board(name)):
        query = fill(expr, values)
        result = prom.query(query, end) if instant else prom.query_range(query, showcase.started, end, 2)
        if not result and title not in NO_DEMO_EVENT:
            empty.append((title, query))
    assert empty == []


@pytest.mark.parametrize("name", ["training-run.json", "training-overview.json"])
def test_variable_queries_list_the_runs(showcase, name):
    prom = showcase.stack.prometheus
    end = time.time()
    values = variables(showcase, end)
    for variable in board(name)["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = fill(variable["query"], values)
        if query.startswith("query_result("):
            series = prom.query(query[len("query_result("):-1], end)
            listed = [re.search(variable["regex"].strip("/"), json.dumps(s["metric"]).replace('": "', '="')).group(1)
                      for s in series]
            # The latest started run first, finished runs included: the dashboard opens on it.
            starts = prom.query("max by (run) (max_over_time(training_run_start_timestamp_seconds[1h]))", end)
            latest = max(starts, key=lambda s: s["value"])["metric"]["run"]
            assert listed[0] == latest and "demo-crash" in listed and "demo-overfit" in listed
            continue
        match, label = re.fullmatch(r"label_values\((.*), (\w+)\)", query).groups()
        listed = prom.api(f"label/{label}/values", **{"match[]": match})
        if variable["name"] in ("cluster", "namespace"):
            assert listed == []  # the local stack attaches no such label; the variable's ".*" matches its absence
        else:
            assert listed, variable["name"]


def test_spike_panel_shows_the_one_step_spike(showcase):
    """The demo's bad batch is one step between two scrapes: the windowed maximum carries it above the spike
    alert's threshold on the panel, at the step of the fault."""
    prom = showcase.stack.prometheus
    t = Thresholds.load(showcase.thresholds)
    end = time.time()
    panels = report.fetch(prom, t, "demo-spike", start=showcase.started, end=end, job="training", points=2000)
    lines = {line.label: line for line in panels["Loss spikes"]}
    peak, threshold = lines["demo-spike windowed max"], lines["demo-spike spike threshold"]
    common, i, j = np.intersect1d(peak.x, threshold.x, return_indices=True)
    above = common[peak.y[i] > threshold.y[j]]
    assert above.size, "the spike never rose above the threshold on the panel"
    fault_step = 0.3 * showcase.steps
    assert np.any(np.abs(above - fault_step) < 0.02 * showcase.steps), above
    size = {line.label: line for line in panels["Spike size"]}["demo-spike"]
    assert size.y.max() > t.number("alerts.TrainingLossSpike.sigmas")


def test_non_finite_steps_are_counted_once_each(showcase):
    """The bars of each interval add up to the exporter's own count: one event is one step, not 1.3."""
    prom = showcase.stack.prometheus
    end = time.time()
    panel = next(p for p in board("training-run.json")["panels"] if p["title"] == "Non-finite steps")
    bars = prom.query_range(fill(panel["targets"][0]["expr"], variables(showcase, end, run="demo-nan")),
                            showcase.started, end, 2)
    total = prom.query('max(last_over_time(training_loss_nonfinite_total{run="demo-nan"}[1h]))', end)[0]["value"]
    assert total >= 1 and sum(v for _, v in bars[0]["values"]) == total


def test_runs_overlay_by_step(showcase):
    """The by-step panel's own queries, paired as its transformations pair them (same instant, same run): each
    run's x is its step, so the same step has the same x whenever each run reached it."""
    prom = showcase.stack.prometheus
    end = time.time()
    values = variables(showcase, end, run="demo-healthy|demo-healthy-finished")
    panel = next(p for p in board("training-run.json")["panels"] if p["title"] == "Train loss by step")
    results = {t["refId"]: prom.query_range(fill(t["expr"], values), showcase.started, end, 2)
               for t in panel["targets"]}
    steps = {(s["metric"]["run"], ts): v for s in results["step"] for ts, v in s["values"]}
    curves = defaultdict(dict)
    for series in results["value"]:
        run = series["metric"]["run"]
        for ts, v in series["values"]:
            if (run, ts) in steps:
                curves[run][steps[(run, ts)]] = v
    assert set(curves) == {"demo-healthy", "demo-healthy-finished"}
    # The x values are steps: both runs start near step 0 and go up by step, whatever the wall time.
    for run, curve in curves.items():
        x = sorted(curve)
        assert x[0] < 0.1 * showcase.steps and x[-1] > 0.2 * showcase.steps, run
    finished_last = max(curves["demo-healthy-finished"])
    assert finished_last == pytest.approx(showcase.steps // 4, abs=5)
    # The same seed and data: over the steps both reached, the two curves agree.
    shared = [x for x in curves["demo-healthy-finished"] if 0.1 * showcase.steps < x <= finished_last]
    near = [min(curves["demo-healthy"], key=lambda s: abs(s - x)) for x in shared]
    assert shared and np.median([abs(curves["demo-healthy"][n] - curves["demo-healthy-finished"][x])
                                 / curves["demo-healthy-finished"][x] for x, n in zip(shared, near)]) < 0.2


def test_crashed_run_stays_in_the_overview_after_its_series_went_stale(showcase):
    prom = showcase.stack.prometheus
    end = time.time()
    assert prom.query('training_step{run="demo-crash"}', end) == []  # stale: the process is gone
    values = variables(showcase, end)
    overview = board("training-overview.json")
    runs = next(p for p in overview["panels"] if p["title"] == "Runs")
    rows = {t["refId"]: {r["metric"]["run"]: r for r in prom.query(fill(t["expr"], values), end)}
            for t in runs["targets"]}
    assert rows["status"]["demo-crash"]["metric"]["status"] == "lost"
    assert rows["status"]["demo-healthy-finished"]["metric"]["status"] == "completed"
    assert rows["status"]["demo-healthy"]["metric"]["status"] in ("running", "completed")
    assert 0.25 * showcase.steps <= rows["step"]["demo-crash"]["value"] <= 0.35 * showcase.steps
    assert rows["seen"]["demo-crash"]["value"] / 1000 < end - 30
    comparison = next(p for p in overview["panels"] if p["title"] == "Run comparison")
    info = next(t for t in comparison["targets"] if t["refId"] == "info")
    configs = {r["metric"]["run"]: r["metric"] for r in prom.query(fill(info["expr"], values), end)}
    assert configs["demo-crash"]["config_scenario"] == "crash" and "instance" not in configs["demo-crash"]


@pytest.mark.parametrize("run", ["demo-spike", "demo-overfit"])
def test_report_png_is_drawn_from_real_data(showcase, tmp_path, run):
    prom = showcase.stack.prometheus
    t = Thresholds.load(showcase.thresholds)
    end = time.time()
    since = end - showcase.started
    path = report.main(prom.url, run, t, out=tmp_path, since=since, end=end, job="training")
    assert path == tmp_path / f"{run}.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 1000 and pixels.shape[1] > 1000
    assert pixels.std() > 0.05  # curves, not a blank canvas

    panels = report.fetch(prom, t, run, start=end - since, end=end, job="training")
    assert set(panels) == {s.title for s in all_panels(t) if s.kind in report.DRAWN and s.in_report}
    curves = {line.label: line for line in panels["Learning curves"]}
    assert set(curves) == {run, f"{run} val"}
    # The x-axis is the optimizer step, not time: it ends at the run's last step.
    last_step = prom.query(f'max(training_step{{run="{run}"}})', end)[0]["value"]
    assert curves[run].x.max() == pytest.approx(last_step, rel=0.02)
    if run == "demo-overfit":
        # Overfitting shows as a rising val loss over a falling train loss.
        val, train = curves[f"{run} val"].y, curves[run].y
        assert val[-1] > val[np.nanargmin(val)] * 1.25
        finite = train[np.isfinite(train)]
        assert finite[-1] < finite[0]
