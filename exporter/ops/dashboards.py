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
from typing import Dict, List, Sequence, Tuple

from .links import OVERVIEW_UID, RUN_UID, base_url
from .panels import Level, PanelSpec, Query, Selectors, annotations, run_panels, run_status, event_queries, step_by_run
from .thresholds import Thresholds

DATASOURCE = "${datasource}"
# The by-step panels pair each value with the step of the same run at the same instant (two table queries
# merged on time and run), then make one column per run against the step: the trend panel's x field.
STEP_FIELD = "step"


@functools.lru_cache(maxsize=None)
def _sdk() -> SimpleNamespace:
    """The SDK's modules by name; imported on first use, so the exporter never needs the SDK."""
    try:
        from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, table, timeseries, trend
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models import common as common_models
        from grafana_foundation_sdk.models import dashboard as models
        from grafana_foundation_sdk.models import prometheus as prom_models
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the dashboards need grafana-foundation-sdk: pip install "
                                  "'training-exporter[dashboards]'") from exc
    return SimpleNamespace(dashboard=dashboard, timeseries=timeseries, trend=trend, stat=stat, table=table,
                           prometheus=prometheus, common=common, common_models=common_models, models=models,
                           prom_models=prom_models, JSONEncoder=JSONEncoder)


def _datasource():
    return _sdk().models.DataSourceRef(type_val="prometheus", uid=DATASOURCE)


def _transform(id_val: str, options: Dict):
    return _sdk().models.DataTransformerConfig(id_val=id_val, options=options)


def _prop(id_val: str, value):
    return _sdk().models.DynamicConfigValue(id_val=id_val, value=value)


def _variables(t: Thresholds, with_run: bool) -> List:
    """Datasource, the identity labels (scope first, each filtered by those before it), then run, rank, metric."""
    dashboard, models = _sdk().dashboard, _sdk().models
    ds = _datasource()
    s = Selectors(t)

    def query(name: str, expr: str):
        return (dashboard.QueryVariable(name).label(name.capitalize()).datasource(ds).query(expr)
                .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED))

    def multi(v):
        return v.multi(True).include_all(True).all_value(".*").sort(models.VariableSort.ALPHABETICAL_ASC)

    variables = [dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")]
    scope: List[str] = []
    for label in (x for x in s.labels if x != "run"):
        matchers = "{" + ", ".join(scope) + "}" if scope else ""
        variables.append(multi(query(label, f"label_values(training_step{matchers}, {label})")))
        scope.append(f'{label}=~"${label}"')
    if with_run:
        # Most recently started first and no "All": the dashboard opens on the latest run, not every run of the
        # time range.
        variables += [
            query("run", f"query_result(sort_desc(max by (run) (max_over_time("
                         f"training_run_start_timestamp_seconds{{{s.scope}}}[$__range]))))")
            .regex('/run="([^"]+)"/').multi(True).sort(models.VariableSort.DISABLED),
            multi(query("rank", f"label_values(training_step{{{s.run}}}, rank)")),
            multi(query("metric", f"label_values(training_eval_metric{{{s.run}}}, metric)")),
        ]
    return variables


def _levels(spec: PanelSpec) -> Tuple[Level, ...]:
    return tuple(sorted(spec.levels + ((Level(0.0, "zero"),) if spec.zero_line else ()), key=lambda x: x.value))


def _dashed_lines(panel, spec: PanelSpec):
    """The alert's constants as dashed lines (Grafana's thresholds, drawn, not used for colour)."""
    sdk = _sdk()
    levels = _levels(spec)
    if not levels:
        return panel
    alert_colours = iter(["red", "orange"] * len(levels))
    steps = [sdk.models.Threshold(value=None, color="transparent")]
    steps += [sdk.models.Threshold(value=x.value, color="text" if x.label == "zero" else next(alert_colours))
              for x in levels]
    return (panel.thresholds(sdk.dashboard.ThresholdsConfig().mode(sdk.models.ThresholdsMode.ABSOLUTE).steps(steps))
            .thresholds_style(sdk.common.GraphThresholdsStyleConfig()
                              .mode(sdk.common_models.GraphThresholdsStyleMode.DASHED)))


def _graph(panel, spec: PanelSpec):
    """What time-series and by-step panels share: colour by run name, gaps as gaps, shared tooltips, scales."""
    sdk = _sdk()
    common, cm = sdk.common, sdk.common_models
    panel = (panel.title(spec.title).description(spec.description).datasource(_datasource()).unit(spec.unit)
             .height(8).span(spec.width).line_width(1).fill_opacity(0).span_nulls(False)
             .color_scheme(sdk.dashboard.FieldColor().mode("palette-classic-by-name"))
             .legend(common.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.LIST)
                     .placement(cm.LegendPlacement.BOTTOM))
             .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
    panel = _dashed_lines(panel, spec)
    if spec.log_scale:
        panel = panel.scale_distribution(common.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10))
    return panel


def _timeseries(spec: PanelSpec):
    sdk = _sdk()
    panel = _graph(sdk.timeseries.Panel(), spec)
    for i, q in enumerate(spec.queries):
        ref = chr(65 + i)
        panel = panel.with_target(sdk.prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref))
        if q.style == "threshold":
            panel = panel.override_by_query(ref, [_prop("custom.lineStyle", {"fill": "dash", "dash": [10, 10]})])
        elif q.style == "right":
            panel = panel.override_by_query(ref, [_prop("custom.axisPlacement", "right"),
                                                  _prop("unit", spec.right_unit)])
        elif q.style == "bars":
            panel = panel.override_by_query(ref, [_prop("custom.drawStyle", "bars"),
                                                  _prop("custom.fillOpacity", 80)])
    if spec.repeat:
        panel = panel.repeat(spec.repeat).repeat_direction("h").max_per_row(2)
    return panel


def _by_step(spec: PanelSpec, t: Thresholds):
    """A trend panel (x: a number field): the value of each run against its step, one column per run."""
    sdk = _sdk()
    (query,) = spec.queries

    def table(expr: str, ref: str):
        return (sdk.prometheus.Dataquery().expr(expr).range().format(sdk.prom_models.PromQueryFormat.TABLE)
                .ref_id(ref))

    x = f"{STEP_FIELD}\\run"  # groupingToMatrix names its first column "<row field>\\<column field>"
    # Each run's column has values only at its own steps, so its line joins its own points; on a step axis a
    # crash ends the line, it leaves no gap to show.
    return (_graph(sdk.trend.Panel(), spec).span_nulls(True).show_points(sdk.common_models.VisibilityMode.NEVER)
            .with_target(table(step_by_run(t), "step")).with_target(table(f"max by (run) ({query.expr})", "value"))
            .with_transformation(_transform("merge", {}))
            .with_transformation(_transform("organize", {"renameByName": {"Value #step": STEP_FIELD}}))
            .with_transformation(_transform("groupingToMatrix", {"columnField": "run", "rowField": STEP_FIELD,
                                                                 "valueField": "Value #value", "emptyValue": "null"}))
            .with_transformation(_transform("convertFieldType", {"conversions": [
                {"targetField": x, "destinationType": "number"}]}))
            .with_transformation(_transform("sortBy", {"sort": [{"field": x, "desc": False}]}))
            .x_field(x).override_by_name(x, [_prop("displayName", "step")]))


def _instant(expr: str, ref: str, legend: str = ""):
    sdk = _sdk()
    q = sdk.prometheus.Dataquery().expr(expr).instant().ref_id(ref)
    return q.legend_format(legend) if legend else q.format(sdk.prom_models.PromQueryFormat.TABLE)


def _stat(spec: PanelSpec, height: int = 4):
    sdk = _sdk()
    cm = sdk.common_models
    panel = (sdk.stat.Panel().title(spec.title).description(spec.description).datasource(_datasource())
             .unit(spec.unit).height(height).span(spec.width).graph_mode(cm.BigValueGraphMode.NONE)
             .reduce_options(sdk.common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    for i, q in enumerate(spec.queries):
        panel = panel.with_target(_instant(q.expr, chr(65 + i), q.legend or "__auto"))
    if spec.text_mode:
        panel = panel.text_mode(cm.BigValueTextMode(spec.text_mode))
    if spec.levels:
        steps = [sdk.models.Threshold(value=None, color="green")] + [
            sdk.models.Threshold(value=x.value, color="red") for x in spec.levels]
        thresholds = sdk.dashboard.ThresholdsConfig().mode(sdk.models.ThresholdsMode.ABSOLUTE).steps(steps)
        panel = panel.thresholds(thresholds).color_mode(cm.BigValueColorMode.VALUE)
    else:
        panel = panel.color_mode(cm.BigValueColorMode.NONE)
    return panel


def _alerts(spec: PanelSpec):
    """Firing alerts, one row each; the alert name opens its runbook section."""
    sdk = _sdk()
    (query,) = spec.queries
    return (sdk.table.Panel().title(spec.title).description(spec.description).datasource(_datasource())
            .height(5).span(spec.width).with_target(_instant(query.expr, "A"))
            .with_transformation(_transform("organize", {
                "excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True},
                "indexByName": {"alertname": 0, "severity": 1, "run": 2}}))
            .override_by_name("alertname", [_prop("links", [{"title": "Runbook", "url": "${__data.fields.runbook}",
                                                            "targetBlank": True}])])
            .override_by_name("runbook", [_prop("custom.hidden", True)])
            .no_value("no alert firing"))


_BUILDERS = {"timeseries": _timeseries, "stat": _stat, "alerts": _alerts}


def _encode(board) -> Dict:
    return json.loads(json.dumps(board.build(), cls=_sdk().JSONEncoder))


def _links(t: Thresholds, to: str, title: str):
    dashboard, models = _sdk().dashboard, _sdk().models
    return [
        dashboard.DashboardLink(title).type(models.DashboardLinkType.DASHBOARDS).tags(["training"])
        .as_dropdown(False).include_vars(True).keep_time(True).icon("dashboard").url(f"/d/{to}"),
        dashboard.DashboardLink("Runbook").type(models.DashboardLinkType.LINK).url(base_url(t, "links.runbook_url"))
        .icon("doc").target_blank(True).tooltip("What each training alert means and what to do about it"),
    ]


def run_dashboard(t: Thresholds) -> Dict:
    """The "Training run" dashboard: the seed's diagnoses of the selected runs, each with its alert's threshold."""
    dashboard, models = _sdk().dashboard, _sdk().models
    board = (dashboard.Dashboard("Training run").uid(RUN_UID).tags(["training"]).refresh("30s")
             .time("now-6h", "now").tooltip(models.DashboardCursorSync.TOOLTIP).readonly()
             .description("The seed's diagnoses of training runs exported by training-exporter, each panel with "
                          "the threshold of its alert.")
             .links(_links(t, OVERVIEW_UID, "Training overview")))
    for variable in _variables(t, with_run=True):
        board = board.with_variable(variable)
    for name, expr, colour, _ in annotations(t):
        board = board.annotation(dashboard.AnnotationQuery().name(name).datasource(_datasource()).enable(True)
                                 .icon_color(colour).expr(expr))
    for row in run_panels(t):
        board = board.with_row(dashboard.Row(row.title))
        for spec in row.panels:
            board = board.with_panel(_by_step(spec, t) if spec.kind == "by_step" else _BUILDERS[spec.kind](spec))
    doc = _encode(board)
    # Prometheus annotation fields the SDK's generic annotation model does not carry.
    formats = {name: title for name, _, _, title in annotations(t)}
    for annotation in doc["annotations"]["list"]:
        if annotation["name"] in formats:
            annotation.update(titleFormat=formats[annotation["name"]], tagKeys="run,severity,split",
                              textFormat="{{run}}", step="1m")
    return doc


def _overview_columns(t: Thresholds) -> Sequence[Tuple[str, str, str, str]]:
    """(refId, column, query, unit) of the overview's tables: instant queries over the whole time range, so
    finished and crashed runs stay listed after their series went stale."""
    s = Selectors(t)
    by, sel = s.by, s.scope
    split = t.text("eval_split")

    def last(expr: str, how: str = "max") -> str:
        return f"{how} by ({by}) (last_over_time({expr}[$__range]))"

    best = event_queries(t, sel)["best_eval_loss"]
    last_step = last(f"training_last_step_timestamp_seconds{{{sel}}}")
    start = f"min by ({by}) (min_over_time(training_run_start_timestamp_seconds{{{sel}}}[$__range]))"
    return (
        ("status", "Status", run_status(by, sel), ""),
        ("step", "Step", last(f"training_step{{{sel}}}"), "none"),
        ("epoch", "Epoch", last(f"training_epoch{{{sel}}}"), "none"),
        ("seen", "Last step", f"1000 * {last_step}", "dateTimeFromNow"),
        ("train", "Final train loss", last(f"run:training_loss:smoothed{{{sel}}}"), "none"),
        ("val", f"Latest {split} loss", last(f'run:training_eval_loss:latest{{{sel}, split="{split}"}}'), "none"),
        ("best", f"Best {split} loss", best, "none"),
        ("rate", "Steps/s", f"max by ({by}) (avg_over_time(run:training_steps:rate{{{sel}}}[$__range]))",
         "suffix: steps/s"),
        ("duration", "Duration", f"{last_step} - {start}", "s"),
        ("alerts", "Firing alerts", f'count by ({by}) (ALERTS{{alertstate="firing", {sel}}})', "none"),
        ("start", "start_ms", f"1000 * {start}", "none"),
        ("end", "end_ms", f"1000 * {last_step} + 60000", "none"),
    )


def _runs_table(t: Thresholds, title: str, description: str, columns: Sequence[str], config: bool):
    sdk = _sdk()
    s = Selectors(t)
    chosen = [c for c in _overview_columns(t) if c[0] in columns]
    panel = (sdk.table.Panel().title(title).description(description).datasource(_datasource()).height(10).span(24)
             .sort_by([sdk.common.TableSortByFieldState().display_name("Run")]))
    for ref, _, expr, _ in chosen:
        panel = panel.with_target(_instant(expr, ref))
    exclude = {"Time": True, "Value #status": True}
    if config:
        # The run's config labels (config_*) and metadata as columns.
        panel = panel.with_target(_instant(f"max without (instance, rank, local_rank, host) (last_over_time("
                                           f"training_run_info{{{s.scope}}}[$__range]))", "info"))
        exclude["Value #info"] = True
    rename = {f"Value #{ref}": column for ref, column, _, _ in chosen if ref != "status"}
    rename.update(run="Run", status="Status")
    panel = (panel.with_transformation(_transform("merge", {}))
             .with_transformation(_transform("organize", {"excludeByName": exclude, "renameByName": rename})))
    for ref, column, _, unit in chosen:
        if unit:
            panel = panel.override_by_name(column, [_prop("unit", unit)])
    scope = "&".join(f"${{{label}:queryparam}}" for label in s.labels if label not in ("job", "run"))
    url = (f"/d/{RUN_UID}/training-run?${{datasource:queryparam}}&{scope}&var-job=${{__data.fields.job}}"
           "&var-run=${__value.raw}&from=${__data.fields.start_ms}&to=${__data.fields.end_ms}")
    panel = panel.override_by_name("Run", [_prop("links", [{"title": "Run dashboard (the run's time range)",
                                                             "url": url}])])
    for hidden in ("start_ms", "end_ms"):
        if hidden in {c[1] for c in chosen}:
            panel = panel.override_by_name(hidden, [_prop("custom.hidden", True)])
    return panel


def overview_dashboard(t: Thresholds) -> Dict:
    """The "Training overview" dashboard: every run of the time range, its status, losses and alerts, and a
    comparison of the runs' configs and results."""
    sdk = _sdk()
    dashboard = sdk.dashboard
    s = Selectors(t)
    sel = s.scope
    nonfinite = f"training_loss_nonfinite_total{{{sel}}}"

    def stat(title: str, expr: str, description: str):
        return _stat(PanelSpec(title, description, (Query(expr, ""),), kind="stat", width=6), height=5)

    board = (dashboard.Dashboard("Training overview").uid(OVERVIEW_UID).tags(["training"]).refresh("30s")
             .time("now-6h", "now").readonly().links(_links(t, RUN_UID, "Training run"))
             .description("Every training run exported by training-exporter in the time range, with its status, "
                          "alerts and results."))
    for variable in _variables(t, with_run=False):
        board = board.with_variable(variable)
    board = (board
             .with_panel(stat("Running", f'count(max by ({s.by}) (training_run_status{{{sel}, status="running"}}) == 1)'
                                         " or vector(0)", "Runs whose exporter says they are running now."))
             .with_panel(stat("Runs in range", f"count(max by ({s.by}) (last_over_time(training_run_status{{{sel}}}"
                                               "[$__range]))) or vector(0)",
                              "Runs seen in the time range, finished and crashed ones included."))
             .with_panel(stat("Firing alerts", f'count(ALERTS{{alertstate="firing", {sel}}}) or vector(0)',
                              "Training alerts firing now."))
             .with_panel(stat("Non-finite steps", f"sum(max_over_time({nonfinite}[$__range]) - min_over_time("
                                                  f"{nonfinite}[$__range])) or vector(0)",
                              "Steps with a NaN/Inf loss in the time range, all runs: the counters' own count, "
                              "not an extrapolated increase."))
             .with_panel(_runs_table(t, "Runs", "Every run of the time range with its last status (lost: it said "
                                     "running and is no longer scraped), progress, losses and firing alerts; the "
                                     "run name opens its run dashboard over the run's own time range.",
                                     ("status", "step", "epoch", "seen", "train", "val", "alerts", "start", "end"),
                                     config=False))
             .with_panel(_runs_table(t, "Run comparison", "Config labels of each run (training_run_info) beside "
                                     "its results.", ("status", "best", "train", "rate", "duration", "start", "end"),
                                     config=True)))
    return _encode(board)


def render(thresholds: Thresholds) -> Dict[str, str]:
    """File name -> JSON text of each dashboard."""
    return {f"{RUN_UID}.json": json.dumps(run_dashboard(thresholds), indent=2, sort_keys=True) + "\n",
            f"{OVERVIEW_UID}.json": json.dumps(overview_dashboard(thresholds), indent=2, sort_keys=True) + "\n"}


def write(thresholds: Path, out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(Thresholds.load(thresholds)).items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths
