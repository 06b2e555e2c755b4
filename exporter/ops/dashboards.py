"""Grafana dashboards generated with Grafana's foundation SDK from the panel specs in ``panels.py``.

    python -m exporter dashboards --out grafana/dashboards

Needs the ``dashboards`` extra (grafana-foundation-sdk, pinned with its epoch version). The committed JSON
under ``grafana/dashboards/`` equals what this writes; a test checks it.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

from .panels import SEL, PanelSpec, run_panels
from .thresholds import Thresholds

RUN_UID = "training-run"
OVERVIEW_UID = "training-overview"
DATASOURCE = "${datasource}"


@functools.lru_cache(maxsize=None)
def _sdk() -> SimpleNamespace:
    """The SDK's modules by name; imported on first use, so the exporter never needs the SDK."""
    try:
        from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, table, timeseries
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models import common as common_models
        from grafana_foundation_sdk.models import dashboard as models
        from grafana_foundation_sdk.models import prometheus as prom_models
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the dashboards need grafana-foundation-sdk: pip install "
                                  "'training-exporter[dashboards]'") from exc
    return SimpleNamespace(dashboard=dashboard, timeseries=timeseries, stat=stat, table=table,
                           prometheus=prometheus, common=common, common_models=common_models, models=models,
                           prom_models=prom_models, JSONEncoder=JSONEncoder)


def _datasource():
    return _sdk().models.DataSourceRef(type_val="prometheus", uid=DATASOURCE)


def _variables(with_rank: bool) -> List:
    dashboard, models = _sdk().dashboard, _sdk().models
    ds = _datasource()

    def query(name: str, label: str, expr: str, multi: bool):
        v = (dashboard.QueryVariable(name).label(label).datasource(ds).query(expr)
             .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(models.VariableSort.ALPHABETICAL_ASC))
        if multi:
            v = v.multi(True).include_all(True).all_value(".*")
        return v

    variables = [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        query("job", "Job", "label_values(training_step, job)", True),
    ]
    if with_rank:
        variables += [
            query("run", "Run", 'label_values(training_step{job=~"$job"}, run)', True),
            query("rank", "Rank", 'label_values(training_step{job=~"$job", run=~"$run"}, rank)', True),
            query("metric", "Task metric", f"label_values(training_eval_metric{{{SEL}}}, metric)", True),
        ]
    return variables


def _timeseries(spec: PanelSpec):
    sdk = _sdk()
    common, common_models, models = sdk.common, sdk.common_models, sdk.models
    panel = (sdk.timeseries.Panel().title(spec.title).description(spec.description).datasource(_datasource())
             .unit(spec.unit).height(8).span(12).line_width(1).fill_opacity(5).span_nulls(True)
             .legend(common.VizLegendOptions().show_legend(True)
                     .display_mode(common_models.LegendDisplayMode.LIST).placement(common_models.LegendPlacement.BOTTOM)))
    for i, q in enumerate(spec.queries):
        panel = panel.with_target(sdk.prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(chr(65 + i)))
    if spec.zero_line:
        panel = (panel.thresholds(sdk.dashboard.ThresholdsConfig().mode(models.ThresholdsMode.ABSOLUTE)
                                  .steps([models.Threshold(value=None, color="transparent"),
                                          models.Threshold(value=0.0, color="red")]))
                 .thresholds_style(common.GraphThresholdsStyleConfig().mode(common_models.GraphThresholdsStyleMode.DASHED)))
    if spec.log_scale:
        panel = panel.scale_distribution(common.ScaleDistributionConfig()
                                         .type(common_models.ScaleDistribution.LOG).log(10))
    if spec.repeat:
        panel = panel.repeat(spec.repeat).repeat_direction("h").max_per_row(2)
    return panel


def _encode(board) -> Dict:
    return json.loads(json.dumps(board.build(), cls=_sdk().JSONEncoder))


def run_dashboard(thresholds: Thresholds) -> Dict:
    """The "Training run" dashboard: the seed's learning-curve plots for the selected runs."""
    dashboard, models = _sdk().dashboard, _sdk().models
    board = (dashboard.Dashboard("Training run").uid(RUN_UID).tags(["training"]).refresh("30s")
             .time("now-6h", "now").tooltip(models.DashboardCursorSync.CROSSHAIR).readonly()
             .description("Learning curves, gradients and alerts of training runs exported by training-exporter."))
    for variable in _variables(with_rank=True):
        board = board.with_variable(variable)
    board = board.annotation(
        dashboard.AnnotationQuery().name("Training alerts").datasource(_datasource()).enable(True)
        .icon_color("red").expr(f'ALERTS{{alertstate="firing", {SEL}}}'))
    for spec in run_panels(thresholds.number("alerts.TrainingGradientExplosion.factor")):
        board = board.with_panel(_timeseries(spec))
    doc = _encode(board)
    # Prometheus annotation fields the SDK's generic annotation model does not carry.
    doc["annotations"]["list"][-1].update(titleFormat="{{alertname}}", tagKeys="run,severity",
                                          textFormat="{{run}}", step="30s")
    return doc


def overview_dashboard() -> Dict:
    """The "Training overview" dashboard: every run, its status, step, losses, firing alerts, and a link."""
    sdk = _sdk()
    dashboard, stat, table, prometheus, models = sdk.dashboard, sdk.stat, sdk.table, sdk.prometheus, sdk.models
    ds = _datasource()
    job = 'job=~"$job"'

    def instant(expr: str, ref: str):
        return prometheus.Dataquery().expr(expr).instant().format(sdk.prom_models.PromQueryFormat.TABLE).ref_id(ref)

    runs = (table.Panel().title("Runs").description("One row per run; the run name opens its run dashboard.")
            .datasource(ds).height(14).span(24)
            .with_target(instant(f'max by (run, status) (training_run_status{{{job}}} == 1)', "status"))
            .with_target(instant(f"max by (run) (training_step{{{job}}})", "step"))
            .with_target(instant(f"max by (run) (training_epoch{{{job}}})", "epoch"))
            .with_target(instant(f"max by (run) (run:training_loss:smoothed{{{job}}})", "train"))
            .with_target(instant(f'max by (run) (run:training_eval_loss:latest{{{job}, split="val"}})', "val"))
            .with_target(instant(f'count by (run) (ALERTS{{alertstate="firing", {job}}})', "alerts"))
            .with_transformation(models.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(models.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True, "Value #status": True},
                "renameByName": {"run": "Run", "status": "Status", "Value #step": "Step", "Value #epoch": "Epoch",
                                 "Value #train": "Train loss (smoothed)", "Value #val": "Val loss",
                                 "Value #alerts": "Firing alerts"}}))
            .override_by_name("Run", [models.DynamicConfigValue(id_val="links", value=[{
                "title": "Run dashboard", "url": f"/d/{RUN_UID}/training-run?var-run=${{__value.raw}}&${{__url_time_range}}"}])]))

    def stat_panel(title: str, expr: str, description: str):
        return (stat.Panel().title(title).description(description).datasource(ds).height(5).span(6)
                .with_target(prometheus.Dataquery().expr(expr).instant().ref_id("A")))

    board = (dashboard.Dashboard("Training overview").uid(OVERVIEW_UID).tags(["training"]).refresh("30s")
             .time("now-6h", "now").readonly()
             .description("Every training run exported by training-exporter, with its status and alerts."))
    for variable in _variables(with_rank=False):
        board = board.with_variable(variable)
    board = (board
             .with_panel(stat_panel("Running", f'count(max by (run) (training_run_status{{{job}, status="running"}}) == 1)',
                                    "Runs whose exporter says they are running."))
             .with_panel(stat_panel("Firing alerts", f'count(ALERTS{{alertstate="firing", {job}}}) or vector(0)',
                                    "Training alerts firing now."))
             .with_panel(stat_panel("Samples/s", f"sum(run:training_samples:rate{{{job}}})",
                                    "Training throughput over all runs."))
             .with_panel(stat_panel("Non-finite steps (1h)",
                                    f"sum(increase(training_loss_nonfinite_total{{{job}}}[1h])) or vector(0)",
                                    "Steps with a NaN/Inf loss in the last hour, all runs."))
             .with_panel(runs))
    return _encode(board)


def render(thresholds: Thresholds) -> Dict[str, str]:
    """File name -> JSON text of each dashboard."""
    return {f"{RUN_UID}.json": json.dumps(run_dashboard(thresholds), indent=2, sort_keys=True) + "\n",
            f"{OVERVIEW_UID}.json": json.dumps(overview_dashboard(), indent=2, sort_keys=True) + "\n"}


def write(thresholds: Path, out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(Thresholds.load(thresholds)).items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths
