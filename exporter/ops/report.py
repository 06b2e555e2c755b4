"""The run dashboard's main panels as a PNG, drawn from Prometheus's range queries, without Grafana.

    python -m exporter report --prometheus http://localhost:9090 --run RUN [--since 1h] [--out DIR]

Needs matplotlib (the ``report`` extra). The x-axis is the optimizer step, as the seed plots learning curves,
taken from ``training_step`` at the same instants; the panels and their queries are those of ``panels.py``.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .panels import PanelSpec, run_panels
from .promapi import PrometheusClient

_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass
class Line:
    """One plotted series: its legend, x (steps, or seconds when the run has no step series) and y."""

    label: str
    x: np.ndarray
    y: np.ndarray


def _fill(expr: str, run: str, job: str, rate_interval: str) -> str:
    """The panel's query for one run: an exact run matcher, any rank."""
    quoted = '"' + run.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return (expr.replace('run=~"$run"', f"run={quoted}").replace("$job", job).replace("$rank", ".*")
            .replace("$__rate_interval", rate_interval))


def fetch(client: PrometheusClient, run: str, *, start: float, end: float, job: str = ".+",
          explosion_factor: float = 10.0, points: int = 400) -> Dict[str, List[Line]]:
    """Range-query every report panel of ``run``: panel title -> lines (empty where the run has no data)."""
    step = max(1.0, round((end - start) / points))
    rate_interval = f"{int(max(4 * step, 4))}s"
    steps = client.query_range(_fill('max by (run) (training_step{job=~"$job", run=~"$run"})', run, job, ""),
                               start, end, step)
    step_t, step_v = (np.array([p[i] for p in steps[0]["values"]]) for i in (0, 1)) if steps else (None, None)
    panels: Dict[str, List[Line]] = {}
    for spec in run_panels(explosion_factor):
        if not spec.in_report:
            continue
        lines = []
        for query in spec.queries:
            for series in client.query_range(_fill(query.expr, run, job, rate_interval), start, end, step):
                t = np.array([p[0] for p in series["values"]])
                y = np.array([p[1] for p in series["values"]])
                x = np.interp(t, step_t, step_v) if step_t is not None else t - start
                label = _LEGEND.sub(lambda m: series["metric"].get(m.group(1), ""), query.legend)
                lines.append(Line(label, x, y))
        panels[spec.title] = lines
    return panels


def render(panels: Dict[str, List[Line]], specs: Dict[str, PanelSpec], title: str, path: Path,
           x_label: str = "step") -> Path:
    """Draw the panels on one grid and save it as PNG."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the report needs matplotlib: pip install 'training-exporter[report]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        spec = specs[name]
        for line in lines:
            ax.plot(line.x, line.y, label=line.label, linewidth=1)
        if spec.zero_line:
            ax.axhline(0, color="red", linestyle="--", linewidth=0.8)
        if spec.log_scale and any((line.y > 0).any() for line in lines):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(x_label)
        if lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(prometheus: str, run: str, *, out: Path = Path("."), since: float = 3600.0, end: Optional[float] = None,
         job: str = ".+", explosion_factor: float = 10.0) -> Path:
    """Fetch and draw the report of ``run`` over the last ``since`` seconds; returns the PNG's path."""
    end = end if end is not None else time.time()
    client = PrometheusClient(prometheus)
    panels = fetch(client, run, start=end - since, end=end, job=job, explosion_factor=explosion_factor)
    if not any(panels.values()):
        raise LookupError(f"Prometheus at {prometheus} has no data for run {run!r} in the last {since:g}s")
    specs = {s.title: s for s in run_panels(explosion_factor)}
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run)
    return render(panels, specs, f"Training run {run}", out / f"{safe}.png")
