"""Helpers to write `promtool test rules` files from Python-built series and run them."""
from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path
from urllib.parse import quote_plus
from typing import Dict, Iterable, List, Optional

import yaml

from exporter.ops import rules
from exporter.ops.links import base_url
from exporter.ops.thresholds import Thresholds
from exporter.stack.servers import binary

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = ROOT / "deploy" / "prometheus" / "thresholds.yaml"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
_KEY = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")

Series = Dict[str, List[Optional[float]]]


def fmt(value) -> str:
    if value is None:
        return "_"
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return f"{value:.10g}"


def selector(key: str, labels: Dict[str, str]) -> str:
    """``name{a="b"}`` with ``labels`` merged in."""
    m = _KEY.match(key)
    name, inner = m.group(1), m.group(2)
    pairs = dict(labels)
    if inner:
        for part in re.findall(r'(\w+)="([^"]*)"', inner):
            pairs[part[0]] = part[1]
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(pairs.items())) + "}"


def input_series(series: Series, labels: Dict[str, str]) -> List[Dict[str, str]]:
    return [{"series": selector(key, labels), "values": " ".join(fmt(v) for v in values)}
            for key, values in series.items()]


def process_series(n: int, *, running: Iterable[float] = (), start: float = 0.0) -> Series:
    """What every exporter serves beside the training values: status, start time, and `up`."""
    running = list(running) or [1.0] * n
    return {
        'training_run_status{status="running"}': running,
        "training_run_start_timestamp_seconds": [start] * n,
        "up": [1.0] * n,
    }


def fired(test_name: str, minutes: int) -> Dict:
    """A promql test whose result lists every (alertname, severity) that fired at any time of the test."""
    # The Watchdog fires always, by design: it says nothing about the run.
    return {"expr": f'group by (alertname, severity, run) '
                    f'(count_over_time(ALERTS{{alertstate="firing", alertname!="Watchdog"}}[{minutes}m]))',
            "eval_time": f"{minutes}m"}


def write_and_run(tmp: Path, tests: List[Dict], rule_dir: Path = RULES_DIR,
                  evaluation: str = "1m") -> subprocess.CompletedProcess:
    """Write one promtool test file with ``tests`` (test groups) against the rule files in ``rule_dir``; promtool
    evaluates every group each ``evaluation``."""
    doc = {
        "rule_files": sorted(str(p) for p in rule_dir.glob("*.rules.yml")),
        "evaluation_interval": evaluation,
        "group_eval_order": list(rules.GROUP_ORDER),
        "tests": tests,
    }
    path = tmp / "rules_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=10_000))
    return subprocess.run([binary("promtool"), "test", "rules", str(path)], capture_output=True, text=True)


def generated_rules(tmp: Path, thresholds: Path = THRESHOLDS) -> Path:
    out = tmp / "rules"
    rules.write(thresholds, out)
    return out


def alerts_fired(tmp: Path, name: str, series: Series, labels: Dict[str, str], minutes: int,
                 rule_dir: Path = RULES_DIR) -> List[Dict[str, str]]:
    """Which alerts the rules fire on ``series`` over ``minutes``: promtool shows the set when told it is empty."""
    test = {"name": name, "interval": "1m", "input_series": input_series(series, labels),
            "promql_expr_test": [dict(fired(name, minutes), exp_samples=[])]}
    result = write_and_run(tmp, [test], rule_dir)
    if result.returncode == 0:
        return []
    got = re.search(r"got:(.*)", result.stdout + result.stderr, re.S)
    if got is None or "FAILED" not in result.stdout + result.stderr:
        raise AssertionError(result.stdout + result.stderr)
    return [dict(re.findall(r'(\w+)="([^"]*)"', item)) for item in re.findall(r"\{[^}]*\}", got.group(1))]


def synthetic(minutes: int, loss=lambda step: 1.0, *, steps_per_minute: int = 60, grad_norm=lambda step: 1.0,
              val=None, eval_every: int = 10) -> Series:
    """A run sampled once a minute for ``minutes`` scrapes: ``loss(step)`` and ``grad_norm(step)`` per step,
    ``val(minute)`` evaluated every ``eval_every`` minutes (None: no evaluations)."""
    out: Series = {k: [] for k in (
        "training_step", "training_step_loss_sum", "training_step_loss_count",
        "training_step_duration_seconds_count", 'training_loss{split="train"}', "training_loss_recent_max",
        "training_grad_norm", "training_grad_norm_recent_max", "training_loss_nonfinite_total",
        "training_grad_nonfinite_total", "training_scaler_skipped_steps_total",
        "training_last_step_timestamp_seconds", "training_last_progress_timestamp_seconds")}
    if val is not None:
        out['training_loss{split="val"}'] = []
        out['training_eval_timestamp_seconds{split="val"}'] = []
    total, step, last_val, last_eval = 0.0, 0, None, None
    for minute in range(minutes):
        losses = [loss(s) for s in range(step, step + steps_per_minute)]
        norms = [grad_norm(s) for s in range(step, step + steps_per_minute)]
        step += steps_per_minute
        total += sum(losses)
        out["training_step"].append(step)
        out["training_step_loss_sum"].append(total)
        out["training_step_loss_count"].append(step)
        out["training_step_duration_seconds_count"].append(step)
        out['training_loss{split="train"}'].append(losses[-1])
        out["training_loss_recent_max"].append(max(losses))
        out["training_grad_norm"].append(norms[-1])
        out["training_grad_norm_recent_max"].append(max(norms))
        for counter in ("training_loss_nonfinite_total", "training_grad_nonfinite_total",
                        "training_scaler_skipped_steps_total"):
            out[counter].append(0)
        out["training_last_step_timestamp_seconds"].append(minute * 60)
        out["training_last_progress_timestamp_seconds"].append(minute * 60)
        if val is not None:
            if minute > 0 and minute % eval_every == 0:
                last_val, last_eval = val(minute), minute * 60
            out['training_loss{split="val"}'].append(last_val)
            out['training_eval_timestamp_seconds{split="val"}'].append(last_eval)
    out.update(process_series(minutes))
    return out


def alert_test(eval_minute: int, alertname: str, *expected: Dict) -> Dict:
    """An alert_rule_test at ``eval_minute``: ``expected`` are dicts of exp_labels/exp_annotations."""
    return {"eval_time": f"{eval_minute}m", "alertname": alertname, "exp_alerts": list(expected)}


def firing(alertname: str, description: str, **labels: str) -> Dict[str, Dict[str, str]]:
    """The exact labels and annotations of ``alertname`` firing for run r1 of job "training" (``labels`` added or
    overriding), as promtool expects them: summary from the generated rules, links from the thresholds file."""
    t = Thresholds.load(THRESHOLDS)
    rule = next(r for r in rules.alerting_rules(t) if r["alert"] == alertname)
    labels = {"job": "training", "run": "r1", **labels}
    identity = [x.strip() for x in t.identity.split(",")]
    query = "&".join(f"var-{x}={quote_plus(labels.get(x, ''))}" for x in identity)
    return {"exp_labels": {"severity": rule["labels"]["severity"], **labels},
            "exp_annotations": {"summary": rule["annotations"]["summary"], "description": description,
                                "runbook_url": f"{base_url(t, 'links.runbook_url')}#alert-name-{alertname.lower()}",
                                "dashboard_url": f"{base_url(t, 'links.grafana_url')}/d/training-run/training-run"
                                                 f"?{query}"}}
