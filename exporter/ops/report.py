"""The run dashboard's panels as a PNG, drawn from Prometheus's range queries against the step, without Grafana.

    python -m exporter report --prometheus http://localhost:9090 --run RUN [--since 1h] [--out DIR]

Needs matplotlib (the ``report`` extra). The x-axis is the optimizer step, as the seed plots learning curves: each
value is paired with the run's ``training_step`` at the same instant, as the dashboard's by-step panels pair them.
The panels, their queries and the alerts' thresholds they draw are those of ``panels.py``.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .panels import PanelSpec, Query, Row, Selectors, fill, regex_literal, run_panels, step_by_run
from .promapi import PrometheusClient
from .thresholds import Thresholds

_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
DRAWN = ("timeseries", "by_step")


@dataclass
class Line:
    """One plotted series: its legend, x (steps) and y, and the query it came from."""

    label: str
    x: np.ndarray
    y: np.ndarray
    query: Query


def by_step(steps: Sequence[Tuple[float, float]],
            values: Sequence[Tuple[float, float]]) -> Tuple[np.ndarray, np.ndarray]:
    """Pair each (time, value) with the step at the same instant; instants without a step are dropped."""
    at = dict(steps)
    pairs = [(at[t], v) for t, v in values if t in at]
    return (np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float))


def variables(t: Thresholds, run: str, job: str, start: float, end: float, step: float) -> Dict[str, str]:
    """Values of the dashboard's variables for one run (exact), any rank, over ``start``..``end``."""
    values = {label: ".*" for label in Selectors(t).labels}
    values.update(run=regex_literal(run), job=job, rank=".*", __range=f"{max(1, int(end - start))}s",
                  __interval=f"{step:g}s", __rate_interval=f"{max(4 * step, 4):g}s")
    return values


def report_rows(t: Thresholds) -> List[Row]:
    """The rows of the run dashboard that the report draws (not the header of latest values)."""
    rows = [Row(r.title, tuple(p for p in r.panels if p.kind in DRAWN and p.in_report)) for r in run_panels(t)]
    return [r for r in rows if r.panels]


def fetch(client: PrometheusClient, t: Thresholds, run: str, *, start: float, end: float, job: str = ".+",
          points: int = 400) -> Dict[str, List[Line]]:
    """Range-query every report panel of ``run``: panel title -> lines against the step (empty where no data)."""
    step = max(1.0, round((end - start) / points))
    values = variables(t, run, job, start, end, step)
    steps = client.query_range(fill(step_by_run(t), values), start, end, step)
    step_values = steps[0]["values"] if steps else []
    panels: Dict[str, List[Line]] = {}
    for row in report_rows(t):
        for spec in row.panels:
            lines = []
            for query in spec.queries:
                for series in client.query_range(fill(query.expr, values), start, end, step):
                    x, y = by_step(step_values, series["values"])
                    label = _LEGEND.sub(lambda m: series["metric"].get(m.group(1), ""), query.legend)
                    lines.append(Line(label, x, y, query))
            panels[spec.title] = lines
    return panels


def render(panels: Dict[str, List[Line]], rows: Sequence[Row], title: str, path: Path) -> Path:
    """Draw the panels, a row of the dashboard per line of the grid, and save it as PNG."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the report needs matplotlib: pip install 'training-exporter[report]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    cols = max(len(r.panels) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(5.5 * cols, 3.4 * len(rows)), squeeze=False)
    for row, ax_row in zip(rows, axes):
        for spec, ax in zip(row.panels, ax_row):
            _draw(ax, spec, panels.get(spec.title, []), f"{row.title}: {spec.title}", PercentFormatter)
        for ax in ax_row[len(row.panels):]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def _draw(ax, spec: PanelSpec, lines: List[Line], title: str, percent) -> None:
    right = None
    for line in lines:
        if line.query.style == "right":
            right = right or ax.twinx()
            right.plot(line.x, line.y, label=line.label, linewidth=1, color="tab:gray")
            right.set_ylabel(spec.right_unit.replace("suffix:", "").strip() if spec.right_unit else "")
            right.legend(fontsize=7, loc="lower right")
        elif line.query.style == "bars":
            if np.nansum(line.y) > 0:
                ax.vlines(line.x, 0, line.y, label=line.label, linewidth=2)
        else:
            ax.plot(line.x, line.y, label=line.label, linewidth=1,
                    linestyle="--" if line.query.style == "threshold" else "-")
    for i, level in enumerate(spec.levels):
        ax.axhline(level.value, color=("red", "orange")[i % 2], linestyle="--", linewidth=0.9, label=level.label)
    if spec.zero_line:
        ax.axhline(0, color="grey", linestyle="--", linewidth=0.8)
    if spec.log_scale and any((line.y > 0).any() for line in lines):
        ax.set_yscale("log")
    if spec.unit == "percentunit":
        ax.yaxis.set_major_formatter(percent(1.0))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if spec.unit.startswith("suffix:"):
        ax.set_ylabel(spec.unit.replace("suffix:", "").strip())
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left" if right else "best")
    if not any(line.y.size and np.nansum(np.abs(line.y)) > 0 for line in lines):
        ax.text(0.5, 0.5, "none" if lines else "no data", ha="center", va="center", transform=ax.transAxes,
                color="grey")


def main(prometheus: str, run: str, thresholds: Thresholds, *, out: Path = Path("."), since: float = 3600.0,
         end: Optional[float] = None, job: str = ".+") -> Path:
    """Fetch and draw the report of ``run`` over the last ``since`` seconds; returns the PNG's path."""
    end = end if end is not None else time.time()
    client = PrometheusClient(prometheus)
    panels = fetch(client, thresholds, run, start=end - since, end=end, job=job)
    if not any(panels.values()):
        raise LookupError(f"Prometheus at {prometheus} has no data for run {run!r} in the last {since:g}s")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run)
    return render(panels, report_rows(thresholds), f"Training run {run}", out / f"{safe}.png")
