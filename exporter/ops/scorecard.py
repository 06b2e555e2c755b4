"""The detection scorecard: every corpus run replayed through ``promtool test rules``, scored per alert and half.

For each run the generator (``simulate``) produces what Prometheus would have scraped; promtool evaluates the
rule files over it and reports when each alert first fired. A pathology counts as detected when its alert fires
after the onset: a strong one within the longer of 3 evaluations and 30 minutes, a mild one before the run ends.
Any warning or critical alert on a healthy run (or before the onset, or in the healthy twin's namespace) is a
false alarm.
"""
from __future__ import annotations

import concurrent.futures
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from . import rules as rulegen
from .rules import GROUP_ORDER, num
from .simulate import Run, Series, Targets, _seconds, lifecycle_series, scrape_series
from .thresholds import Thresholds

ALERT_OF = {"nan": "TrainingLossNotFinite", "explode": "TrainingGradientExplosion", "spike": "TrainingLossSpike",
            "diverge": "TrainingDiverging", "overfit": "TrainingOverfitting", "plateau": "TrainingPlateau"}
EVAL_INTERVAL = 30  # seconds between rule evaluations in the replay (the thresholds file's default)
_GOT = re.compile(r"\{([^}]*)\}\s*=?>?\s*([-+0-9.eE]+|NaN)")


@dataclass
class Result:
    """How the rules did on one run."""

    run: Run
    first: Dict[Tuple[str, str, str], float]  # (alert, severity, namespace) -> first firing (s)
    after: Dict[Tuple[str, str, str], float]  # the same, counted from the onset only
    expected: Optional[str] = None
    delay: Optional[float] = None  # seconds from onset to the expected alert
    false_alarms: List[str] = field(default_factory=list)

    @property
    def target(self) -> float:
        """The detection deadline after the onset: the longer of 3 evaluations and 30 minutes."""
        return max(3 * self.run.eval_interval, 1800.0)

    @property
    def detected(self) -> bool:
        if self.delay is None:
            return False
        return self.run.pathology.get("strength") != "strong" or self.delay <= self.target


def load_corpus(path: Path) -> List[Run]:
    return [Run.from_dict(d, Path(path).parent) for d in yaml.safe_load(Path(path).read_text())["runs"]]


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "_"
    return "NaN" if math.isnan(v) else ("Inf" if v == math.inf else ("-Inf" if v == -math.inf else f"{v:.8g}"))


def _input(series: Series, labels: Dict[str, str]) -> List[Dict[str, str]]:
    out = []
    for key, values in series.items():
        name, inner = key.split("{", 1)
        pairs = ",".join([inner.rstrip("}")] * bool(inner.rstrip("}")) + [f'{k}="{v}"' for k, v in labels.items()])
        out.append({"series": f"{name}{{{pairs}}}", "values": " ".join(map(_fmt, values))})
    return out


def _first_firing(probe: int, rng: float, at: float, gaps: Sequence[Tuple[float, float]]) -> Dict:
    """When each alert first fired in the ``rng`` seconds before ``at``, per run; answers carry ``probe``. promtool
    keeps evaluating the rules through a simulated Prometheus outage, which a real Prometheus does not: firings
    inside a gap are left out."""
    fired = 'timestamp(ALERTS{alertstate="firing", run!=""})'  # alerts about a run: not the Watchdog
    for start, end in gaps:
        fired += f" unless on () ((vector(time()) >= {start:g}) < {end:g})"
    expr = (f"label_replace(min by (alertname, severity, namespace, run) (min_over_time(({fired})"
            f'[{int(rng)}s:{EVAL_INTERVAL}s])), "probe", "{probe}", "", "")')
    return {"expr": expr, "eval_time": f"{int(at)}s", "exp_samples": []}


def _generate(run: Run) -> List[Dict[str, str]]:
    """The run's promtool input series (and its healthy twin's), on a target of its own."""
    labels = {"job": "training", "instance": f"{run.name}:9945"}
    inputs = _input(scrape_series(run), {**labels, "namespace": run.namespace})
    if run.twin:
        inputs += _input(scrape_series(run, pathology=False), {**labels, "namespace": run.twin["namespace"]})
    return inputs


def replay(run: Run, rule_dir: Path) -> Result:
    """Generate the run (and its twin), replay it through promtool against ``rule_dir``, and score it."""
    return replay_together([run], rule_dir)[0]


def replay_together(runs: Sequence[Run], rule_dir: Path, generated: Optional[Sequence[List[Dict[str, str]]]] = None
                    ) -> List[Result]:
    """Replay runs that share a scrape interval and Prometheus gaps in one promtool test group, and score each.

    Every rule aggregates by the run's identity and each run has a target of its own, so runs replayed together
    do not meet; one promtool process evaluates the rules once per step for all of them. ``generated``: their
    input series, when already made (``_generate``)."""
    if len({(r.scrape, tuple(r.events.get("gap", ()))) for r in runs}) != 1:
        raise ValueError("runs replayed together need one scrape interval and the same gaps")
    scrape, began = runs[0].scrape, time.perf_counter()
    inputs = list(generated) if generated is not None else [_generate(r) for r in runs]
    gaps = [tuple(_seconds(x) for x in runs[0].events["gap"])] if "gap" in runs[0].events else []
    probes: Dict[Tuple[float, float], int] = {}  # (range, eval time) -> probe number
    for run, series in zip(runs, inputs):
        end = len(series[0]["values"].split()) * scrape
        probes.setdefault((end, end), len(probes))
        if run.onset is not None:
            probes.setdefault((end - run.onset, end), len(probes))
    order = sorted(probes, key=probes.get)
    generated_at = time.perf_counter()
    got = _probe(", ".join(r.name for r in runs), scrape, [x for series in inputs for x in series],
                 [(rng, at, gaps) for rng, at in order], rule_dir)
    print(f"{', '.join(r.name for r in runs)}: generated in {generated_at - began:.1f} s, promtool "
          f"{time.perf_counter() - generated_at:.1f} s", file=sys.stderr)

    def of(run: Run, probe: int) -> Dict[Tuple[str, str, str], float]:
        return {key[:3]: at for key, at in got[probe].items() if key[3] == run.name}

    results = []
    for run, series in zip(runs, inputs):
        end = len(series[0]["values"].split()) * scrape
        first = of(run, probes[(end, end)])
        after = of(run, probes[(end - run.onset, end)]) if run.onset is not None else {}
        results.append(score(Result(run, first, after)))
    return results


def score(r: Result) -> Result:
    run = r.run
    expected = ALERT_OF[run.pathology["kind"]] if run.pathology else None
    r.expected = expected
    for (alert, severity, ns), at in sorted(r.first.items(), key=lambda kv: kv[1]):
        if severity == "info":
            continue
        if ns != run.namespace or expected is None or at < run.onset - 1e-6:
            r.false_alarms.append(f"{alert} ({severity}, {ns}) at {at / 60:.0f} min")
    if expected:
        times = [at for (alert, _, ns), at in r.after.items() if alert == expected and ns == run.namespace]
        if times:
            r.delay = max(0.0, min(times) - run.onset)
    return r


def run_corpus(runs: Sequence[Run], rule_dir: Path, workers: int = 2) -> List[Result]:
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(replay, runs, [rule_dir] * len(runs)))


# ------------------------------------------------------------------------------------------------- the report
def _delays(rs: List[Result]) -> str:
    ds = [r for r in rs if r.delay is not None]
    if not ds:
        return "-"
    mid = sorted(ds, key=lambda r: r.delay)[len(ds) // 2]
    worst = max(ds, key=lambda r: r.delay)
    return (f"{mid.delay / 60:.0f} min, {mid.delay * mid.run.rate:.0f} steps, {mid.delay / mid.run.eval_interval:.1f} "
            f"evals / {worst.delay / 60:.0f} min, {worst.delay * worst.run.rate:.0f} steps, "
            f"{worst.delay / worst.run.eval_interval:.1f} evals")


def table(results: List[Result], half: str) -> List[str]:
    rs = [r for r in results if r.run.half == half]
    lines = [f"### {half} half: {len(rs)} runs", "",
             "| alert | strong detected in time | mild detected | false alarms (runs) "
             "| delay: median / slowest (minutes, steps, evaluations) |",
             "| --- | --- | --- | --- | --- |"]
    for kind, alert in ALERT_OF.items():
        mine = [r for r in rs if r.expected == alert]
        strong = [r for r in mine if r.run.pathology.get("strength") == "strong"]
        mild = [r for r in mine if r.run.pathology.get("strength") != "strong"]
        frac = lambda xs: f"{sum(x.detected for x in xs)}/{len(xs)}" if xs else "-"  # noqa: E731
        false = sum(any(f.startswith(alert + " ") for f in r.false_alarms) for r in rs)
        lines.append(f"| {alert} | {frac(strong)} | {frac(mild)} | {false} | {_delays(mine)} |")
    healthy = [r for r in rs if r.expected is None]
    noisy = [r for r in rs if r.false_alarms]
    lines += ["", f"Healthy runs: {len(healthy)}; runs with a false warning or critical alarm: {len(noisy)}.", ""]
    missed = [r for r in rs if r.expected and not r.detected]
    if noisy or missed:
        lines += ["| run | cadence | expected | result |", "| --- | --- | --- | --- |"]
        for r in sorted({r.run.name: r for r in noisy + missed}.values(), key=lambda r: r.run.name):
            what = []
            if r.expected and not r.detected:
                what.append("missed" if r.delay is None else f"late ({r.delay / 60:.0f} min > {r.target / 60:.0f})")
            what += [f"false: {f}" for f in r.false_alarms]
            lines.append(f"| {r.run.name} | {r.run.cadence()} | {r.expected or 'healthy'} | {'; '.join(what)} |")
        lines.append("")
    return lines


def targets_met(results: List[Result], half: str) -> Dict[str, bool]:
    """The corpus issue's targets on ``half``: strong all in time, mild at 80% or better, no false alarms."""
    rs = [r for r in results if r.run.half == half]
    strong = [r for r in rs if r.expected and r.run.pathology.get("strength") == "strong"]
    mild = [r for r in rs if r.expected and r.run.pathology.get("strength") != "strong"]
    return {"strong": all(r.detected for r in strong),
            "mild": not mild or sum(r.detected for r in mild) >= 0.8 * len(mild),
            "quiet": not any(r.false_alarms for r in rs)}


def slowest_changes(t: Thresholds) -> List[str]:
    """What each rule needs to see at the least, from the thresholds: the slowest change it detects."""
    w = "windows."
    smin, trend, slow, look = (t.number(w + "min_steps"), t.duration(w + "trend"), t.duration(w + "trend_slow"),
                               t.duration(w + "lookback"))
    smooth, smooth_slow = t.duration(w + "smoothing"), t.duration(w + "smoothing_slow")
    dv, pl = t.number("alerts.TrainingDiverging.rise_sigmas"), t.number("alerts.TrainingPlateau.improvement_sigmas")
    plw = t.seconds("alerts.TrainingPlateau.window")
    sl = t.number("alerts.TrainingLossDecreasingSlowly.improvement_sigmas")
    look_h, slow_h = t.seconds(w + "lookback") / 3600, t.seconds(w + "trend_slow") / 3600
    ge = "alerts.TrainingGradientExplosion."
    of = "alerts.TrainingOverfitting."
    rows = [
        ("TrainingLossNotFinite", "one NaN/Inf step", "one step"),
        ("TrainingLossSpike", f"one step {num(t.number('alerts.TrainingLossSpike.sigmas'))} sigma above the smoothed "
         "loss", "one step"),
        ("TrainingGradientExplosion", f"one step's norm above {num(t.number(ge + 'factor'))}x the mean norm of "
         f"{t.duration(w + 'baseline')}; or the mean norm x{num(t.number(ge + 'growth_factor'))} over {look}",
         f"x{t.number(ge + 'growth_factor') ** (1 / look_h):.2f} per hour"),
        ("TrainingDiverging", f"a rise of {num(dv)} recent sigma above the best of {look}, still rising over the "
         f"smoothing window ({smooth}; {smooth_slow} below {num(smin)} steps in {smooth}), for "
         f"{t.duration('alerts.TrainingDiverging.for')}", f"{dv / look_h:.2f} recent sigma per hour"),
        ("TrainingOverfitting", f"val {num(100 * t.number(of + 'gap_widening'))}% of the gap and "
         f"{num(t.number(of + 'rise_eval_sigmas'))} + sqrt(2 ln N) eval sigma (N evaluations; at least "
         f"{num(t.number(of + 'min_rise_noise'))} sigma; {num(t.number(of + 'rise_noise'))} sigma before the eval "
         "noise is measured) above its best for "
         f"{num(t.number(of + 'patience_evals'))} evaluations, train within "
         f"{num(t.number(of + 'train_near_best_sigmas'))} sigma and {num(t.number(of + 'train_best_errors'))} "
         "standard errors of its best",
         f"the larger of {num(100 * t.number(of + 'gap_widening'))}% of the gap and "
         f"{num(t.number(of + 'rise_eval_sigmas'))} + sqrt(2 ln N) eval sigma ({num(t.number(of + 'rise_noise'))} "
         f"sigma before the eval noise is measured) in {look}"),
        ("TrainingPlateau", f"best loss improving less than {num(pl)} sigma per {t.duration('alerts.TrainingPlateau.window')}"
         f" (per {slow} below {num(smin)} steps in it)",
         f"progress under {pl * 3600 / plw:.2f} sigma per hour ({pl / slow_h:.3f} at slow step rates) is a plateau"),
        ("TrainingLossDecreasingSlowly", f"best loss improving less than {num(sl)} sigma per plateau window",
         f"{sl * 3600 / plw:.2f} sigma per hour"),
    ]
    lines = ["## The slowest change each rule detects", "",
             "sigma: the run's own per-step standard deviation of the train loss over the trend window ("
             f"{trend}, or {slow} when the run's mean step rate gives fewer than {num(smin)} steps per {trend}); "
             f"recent sigma: the same over the smoothing window ({smooth}) when it holds {num(smin)} steps, else "
             "sigma. Per step: divide the per-hour figure by the steps an hour.", "",
             "| alert | fires on | slowest change detected |", "| --- | --- | --- |"]
    lines += [f"| {a} | {what} | {slowest} |" for a, what, slowest in rows]
    return lines + [""]


def report(results: List[Result], title: str, command: str, t: Optional[Thresholds] = None) -> str:
    runs = [r.run for r in results]
    cadences = sorted({r.cadence() for r in runs})
    lines = [f"# {title}", "", f"Regenerate with `{command}`.", "",
             f"Corpus: {len(runs)} runs ({sum(r.twin is not None for r in runs)} with a same-named twin in another "
             f"namespace), {len(cadences)} cadences. A strong pathology counts when its alert fires within the longer "
             "of 3 evaluations and 30 minutes of its onset, a mild one when it fires before the run ends.", ""]
    for half in ("tuning", "held-out"):
        lines += table(results, half)
        met = targets_met(results, half)
        lines += [f"Targets on the {half} half: strong in time {'met' if met['strong'] else 'NOT met'}, mild at 80% "
                  f"{'met' if met['mild'] else 'NOT met'}, no false alarm {'met' if met['quiet'] else 'NOT met'}.", ""]
    lines += ["## Cadences", ""] + [f"- {c}" for c in cadences] + [""]
    if t is not None:
        lines += slowest_changes(t)
    return "\n".join(lines)


def rule_dir_from(thresholds: Path, tmp: Path) -> Path:
    rulegen.write(thresholds, tmp)
    return tmp


def stats(results: List[Result]) -> Dict[str, float]:
    """Numbers for a quick look: recall and false alarms per half."""
    out = {}
    for half in ("tuning", "held-out"):
        rs = [r for r in results if r.run.half == half and r.expected]
        out[half + " recall"] = statistics.mean(r.detected for r in rs) if rs else math.nan
        out[half + " false"] = sum(bool(r.false_alarms) for r in results if r.run.half == half)
    return out


# --------------------------------------------------------------------------------------------- lifecycle rows
Firing = Dict[Tuple[str, str, str, str], float]  # (alert, severity, namespace, run) -> first firing (s)


@dataclass
class LifecycleResult:
    """How the rules did on one lifecycle row (a crash, a preemption, a resumption, a long checkpoint, ...)."""

    run: Run
    fired: Firing  # over the whole row
    after_return: Firing  # from the run's return on (rows with ``resume``)
    at_end: Firing  # in the last rule evaluation
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_lifecycle(path: Path) -> List[Run]:
    """The corpus's lifecycle rows (its ``lifecycle:`` section)."""
    return [Run.from_dict(d) for d in yaml.safe_load(Path(path).read_text()).get("lifecycle") or []]


def _returned(run: Run) -> Optional[float]:
    """When the run is back after its process ended (the first scrape of the resumed process), or None."""
    ev = run.events
    if "resume" not in ev:
        return None
    ended = next(_seconds(ev[k]) for k in ("crash", "preempt", "preempt_unscraped", "finish") if k in ev)
    back = ended + _seconds(ev["resume"]["after"])
    return math.ceil(back / run.scrape) * run.scrape


def _stale_input(targets: Targets, labels: Dict[str, str]) -> List[Dict[str, str]]:
    """promtool input for each target: a series that leaves the exposition, or whose target stops answering,
    gets a stale marker, as a real Prometheus writes one (nothing while Prometheus itself is down)."""
    out = []
    for instance, series in targets.items():
        up = series["up{}"]
        for item in _input(series, {**labels, "instance": instance}):
            values = item["values"].split()
            for k in range(1, len(values)):
                if values[k] == "_" and values[k - 1] not in ("_", "stale") and up[k] is not None:
                    values[k] = "stale"
            out.append({"series": item["series"], "values": " ".join(values)})
    return out


def _probe(name: str, interval: float, inputs: List[Dict[str, str]],
           probes: Sequence[Tuple[float, float, Sequence[Tuple[float, float]]]], rule_dir: Path
           ) -> List[Dict[Tuple[str, str, str, str], float]]:
    """Replay ``inputs`` through promtool against ``rule_dir`` and answer every probe (range, eval time, gaps):
    when each alert about a run first fired in that range, keyed by (alert, severity, namespace, run)."""
    doc = {"rule_files": sorted(str(p.resolve()) for p in Path(rule_dir).glob("*.rules.yml")),
           "evaluation_interval": f"{EVAL_INTERVAL}s",
           "group_eval_order": list(GROUP_ORDER),
           "tests": [{"name": name, "interval": f"{int(interval)}s", "input_series": inputs,
                      "promql_expr_test": [_first_firing(k, rng, at, gaps) for k, (rng, at, gaps) in enumerate(probes)]}]}
    with tempfile.TemporaryDirectory(prefix="scorecard-") as tmp:
        path = Path(tmp) / "replay.yml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1 << 20))
        proc = subprocess.run([shutil.which("promtool") or "promtool", "test", "rules", str(path)],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 and "got:" not in text:
        raise RuntimeError(f"promtool failed on {name}:\n{text[-3000:]}")
    # A probe that saw an alert fails and prints what it got, one line per alert (one that saw none prints nothing).
    out: List[Dict[Tuple[str, str, str, str], float]] = [{} for _ in probes]
    for inner, value in _GOT.findall(text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', inner))
        if "probe" in lab:
            out[int(lab["probe"])][(lab["alertname"], lab.get("severity", ""), lab.get("namespace", ""),
                                    lab.get("run", ""))] = float(value)
    return out


def _promtool_firing(name: str, inputs: List[Dict[str, str]], interval: float, ranges: Sequence[float],
                     at: float, rule_dir: Path) -> Dict[int, Firing]:
    """For each range (seconds before ``at``), when each alert about a run first fired in it, per run."""
    got = _probe(name, interval, inputs, [(rng, at, []) for rng in ranges], rule_dir)
    return {int(rng): got[i] for i, rng in enumerate(ranges)}


def replay_lifecycle(run: Run, rule_dir: Path) -> LifecycleResult:
    """Generate a lifecycle row (every process of it, and its healthy twin), replay it through promtool against
    ``rule_dir``, and judge it against the row's ``expect``."""
    labels = {"job": "training"}
    inputs = _stale_input(lifecycle_series(run), {**labels, "namespace": run.namespace})
    if run.twin:
        inputs += _stale_input(lifecycle_series(run, events=False), {**labels, "namespace": run.twin["namespace"]})
    end = (int(run.duration // run.scrape) + 1) * run.scrape
    back = _returned(run)
    # From the return on, one scrape and one rule evaluation later: the alert of the absence has resolved.
    quiet = None if back is None else end - (back + run.scrape + EVAL_INTERVAL)
    ranges = [end, EVAL_INTERVAL] + ([quiet] if quiet else [])
    got = _promtool_firing(run.name, inputs, run.scrape, ranges, end, rule_dir)
    r = LifecycleResult(run, got[int(end)], got[int(quiet)] if quiet else {}, got[EVAL_INTERVAL])
    return judge(r)


def judge(r: LifecycleResult) -> LifecycleResult:
    """The row's verdict: every expected alert fired for this run in its namespace, no other warning or
    critical alert fired for any run, nothing fired after the run returned, and a run that vanished for good
    is still alerted at the end (its alert does not resolve by itself)."""
    run = r.run
    mine = lambda key: key[0] in run.expect and key[2] == run.namespace and key[3] == run.name  # noqa: E731
    for alert in run.expect:
        if not any(mine(key) and key[0] == alert for key in r.fired):
            r.problems.append(f"{alert} did not fire")
    for key, at in sorted(r.fired.items(), key=lambda kv: kv[1]):
        if key[1] != "info" and not mine(key):
            r.problems.append(f"unexpected {_name(key)} at {at / 60:.0f} min")
    for key, at in r.after_return.items():
        if key[1] != "info":
            r.problems.append(f"{_name(key)} still firing at {at / 60:.0f} min, after the run returned")
    vanished = any(k in run.events for k in ("crash", "preempt_unscraped")) and "resume" not in run.events
    if vanished:
        for alert in run.expect:
            if not any(mine(key) and key[0] == alert for key in r.at_end):
                r.problems.append(f"{alert} resolved before the end although the run never returned")
    return r


def _name(key: Tuple[str, str, str, str]) -> str:
    alert, severity, namespace, run = key
    return f"{alert} ({severity}, {namespace}, {run})"


def run_lifecycle(runs: Sequence[Run], rule_dir: Path, workers: int = 2) -> List[LifecycleResult]:
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(replay_lifecycle, runs, [rule_dir] * len(runs)))


def _events(run: Run) -> str:
    parts = []
    for kind, value in run.events.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = " for ".join(map(str, value))
        parts.append(f"{kind} {value}")
    if run.twin:
        parts.append(f"same name, healthy, in {run.twin['namespace']}")
    return "; ".join(parts)


def lifecycle_table(results: List[LifecycleResult]) -> List[str]:
    """The lifecycle rows: what happened, what each row expects, what fired, and the verdict."""
    lines = ["## Lifecycle rows", "",
             "Each row drives the real exporter through the lifecycle of its run (processes that crash, are "
             "preempted, finish, resume on another node, or whose node and port another run reuses) and replays "
             "every target through promtool, with the stale markers a real Prometheus writes. A row passes when "
             "its expected alerts fire for its run, no other warning or critical alert fires, nothing fires after "
             "the run returned, and a run that never returned is still alerted at the end.", "",
             "| row | cadence | events | expected | alerts fired (first, minutes) | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r.run.half != "tuning", r.run.name)):
        fired = "; ".join(f"{_name(k)} at {at / 60:.0f}" for k, at in sorted(r.fired.items(), key=lambda kv: kv[1]))
        verdict = "pass" if r.ok else "FAIL: " + "; ".join(r.problems)
        lines.append(f"| {r.run.name} | {r.run.cadence()} | {_events(r.run)} | "
                     f"{', '.join(r.run.expect) or 'nothing'} | {fired or 'none'} | {verdict} |")
    passed = sum(r.ok for r in results)
    return lines + ["", f"Lifecycle rows passed: {passed}/{len(results)}.", ""]


def main(corpus: Path, out: Optional[Path], thresholds: Optional[Path] = None, rule_dir: Optional[Path] = None,
         half: Optional[str] = None, title: str = "Detection scorecard", command: str = "") -> int:
    """Score the rules (generated from ``thresholds``, or the files in ``rule_dir``) on the corpus."""
    import logging
    logging.getLogger("exporter").setLevel(logging.WARNING)
    runs = [r for r in load_corpus(corpus) if half is None or r.half == half]
    rows = [r for r in load_lifecycle(corpus) if half is None or r.half == half]
    with tempfile.TemporaryDirectory(prefix="scorecard-rules-") as tmp:
        rules = rule_dir or rule_dir_from(thresholds, Path(tmp))
        results = run_corpus(runs, rules)
        lifecycle = run_lifecycle(rows, rules)
    text = report(results, title, command, None if rule_dir else Thresholds.load(thresholds))
    if lifecycle:
        text += "\n" + "\n".join(lifecycle_table(lifecycle))
    if out is None:
        print(text)
    else:
        Path(out).write_text(text)
        print(f"wrote {out}")
    return 0
