"""Rules at scale: the shipped rule groups evaluated by a real Prometheus over N runs x 8 ranks of backfilled history.

For each N: a few corpus runs are driven through the real exporter once (exporter/ops/simulate.py) over
``--hours`` of history plus ``--ahead`` into the future, replicated to N runs x ``--ranks`` ranks by label rewrites
(run, rank, instance, namespace), written as OpenMetrics and backfilled with
``promtool tsdb create-blocks-from openmetrics`` into a fresh Prometheus data folder. Prometheus then starts on
loopback with the rule files and the evaluation interval of deploy/prometheus/prometheus.yml, and the benchmark
reads ``prometheus_rule_group_last_duration_seconds`` and ``/api/v1/rules`` after each of ``--evaluations``
evaluations of every group.

Why the history reaches into the future: rules evaluate at "now", so every run must look live (its last sample a
scrape interval old, as when Prometheus scrapes it). Samples written up to ``--ahead`` past the start keep them so
for that long without a scrape target serving 8,000 processes. Blocks reaching past "now" make Prometheus refuse
in-order appends older than their end, so the configuration opens an out-of-order window that lets the recording
rules write their results at "now".

    python benchmarks/rules_at_scale.py --runs 10 100 --scrape 60 --rules BEFORE deploy/prometheus/rules
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.ops.promapi import http_get  # noqa: E402
from exporter.ops.scorecard import load_corpus  # noqa: E402
from exporter.ops.simulate import OpenMetricsRun, scrape_series, write_openmetrics  # noqa: E402
from exporter.ops.thresholds import duration_seconds  # noqa: E402
from exporter.stack.servers import Prometheus, binary  # noqa: E402

# One healthy run and two that go wrong late in their history (alerts firing, fleet rules counting them).
TEMPLATES = ("t-cosine-1s", "t-diverge-strong-1s", "t-spike-strong-1s")
NAMESPACES = 10
_SAMPLE = re.compile(r'^(prometheus_rule_group_(?:last_duration|interval)_seconds)\{rule_group="([^"]+)"\} (\S+)$',
                     re.M)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def render(corpus: Path, start: float, seconds: float, scrape: float) -> List[OpenMetricsRun]:
    """The template runs' scrapes from ``start`` on, each rendered once through the real exporter."""
    runs = {run.name: run for run in load_corpus(corpus)}
    out = []
    for name in TEMPLATES:
        began = time.perf_counter()
        run = replace(runs[name], duration=seconds, scrape=scrape)
        out.append(OpenMetricsRun(scrape_series(run, origin=start), scrape, start))
        say(f"  rendered {name}: {seconds / scrape:.0f} scrapes in {time.perf_counter() - began:.1f} s")
    return out


def targets(templates: Sequence[OpenMetricsRun], runs: int, ranks: int):
    """N runs x ``ranks`` ranks, eight ranks a node, the runs spread over ``NAMESPACES`` namespaces."""
    for i in range(runs):
        for rank in range(ranks):
            slot = i * ranks + rank
            yield templates[i % len(templates)], {
                "job": "training", "namespace": f"team-{i % NAMESPACES}", "run": f"run-{i:04d}",
                "rank": str(rank), "instance": f"node-{slot // 8:04d}:{9945 + slot % 8}"}


def backfill(templates: Sequence[OpenMetricsRun], runs: int, ranks: int, work: Path) -> Dict[str, float]:
    work.mkdir()
    source, data = work / "history.om", work / "prometheus-data"
    began = time.perf_counter()
    with open(source, "w", buffering=1 << 24) as out:
        series = write_openmetrics(out, targets(templates, runs, ranks))
    size = source.stat().st_size
    with open(source, "rb") as f:  # samples = lines, less the "# EOF" line
        samples = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) - 1
    written = time.perf_counter()
    say(f"  wrote {series:,} series, {samples:,} samples, {size / 1e9:.2f} GB of OpenMetrics in "
        f"{written - began:.0f} s; backfilling with promtool")
    subprocess.run([binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
                   check=True, stdout=subprocess.DEVNULL)
    source.unlink()
    blocks = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    done = time.perf_counter()
    say(f"  promtool: {done - written:.0f} s, blocks {blocks / 1e6:.0f} MB")
    return {"series": series, "samples": samples, "om_gb": size / 1e9, "write_s": written - began,
            "promtool_s": done - written, "blocks_mb": blocks / 1e6}


def recording_levels(rules: Path) -> List[List[Dict]]:
    """The recording rules of ``rules`` (each with its group's interval) in dependency order: level 0 reads only
    scraped series, level n reads recordings of lower levels."""
    found = [{**rule, "interval": group.get("interval")} for path in sorted(rules.glob("*.rules.yml"))
             for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "record" in rule]
    by_name = {rule["record"]: rule for rule in found}
    level: Dict[str, int] = {}

    def depth(rule: Dict) -> int:
        if rule["record"] not in level:
            reads = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["expr"])) & by_name.keys() - {rule["record"]}
            level[rule["record"]] = 1 + max((depth(by_name[name]) for name in reads), default=-1)
        return level[rule["record"]]

    levels: List[List[Dict]] = []
    for rule in found:
        n = depth(rule)
        levels += [[] for _ in range(n + 1 - len(levels))]
        levels[n].append(rule)
    return levels


def backfill_recordings(data: Path, rules: Path, start: float, end: float, work: Path) -> float:
    """Give the recorded series of ``rules`` their history from ``start`` to ``end``, as a Prometheus that had
    evaluated them all along would hold it: ``promtool tsdb create-blocks-from rules`` queries a Prometheus on
    ``data`` for one dependency level at a time, and its blocks join ``data`` before the next level. Without
    it the rules' long windows over recorded series would hold only the minutes since the rules were loaded,
    and cost less than in a Prometheus that has run for hours."""
    began = time.perf_counter()
    for n, rules_of_level in enumerate(recording_levels(rules)):
        here = work / f"level-{n}"
        here.mkdir(parents=True)
        by_interval: Dict[str, List[Dict]] = {}
        for rule in rules_of_level:
            by_interval.setdefault(rule["interval"], []).append({"record": rule["record"], "expr": rule["expr"]})
        (here / "level.rules.yml").write_text(yaml.safe_dump({"groups": [
            {"name": f"level-{n}-{i}", "interval": interval, "rules": group}
            for i, (interval, group) in enumerate(by_interval.items())]}))
        (here / "prometheus.yml").write_text(yaml.safe_dump({"global": {"evaluation_interval": "1m"}}))
        (here / "prometheus-data").symlink_to(data.resolve())
        with Prometheus(here / "prometheus.yml", here) as prom:
            prom.wait_ready(timeout=600)
            subprocess.run([binary("promtool"), "tsdb", "create-blocks-from", "rules", "--quiet",
                            f"--start={int(start)}", f"--end={int(end)}", f"--url={prom.url}",
                            f"--output-dir={here / 'blocks'}", str(here / "level.rules.yml")], check=True)
        for block in (here / "blocks").iterdir():
            shutil.move(str(block), data / block.name)
        shutil.rmtree(here)
        say(f"    recorded level {n}: {len(rules_of_level)} rules, {time.perf_counter() - began:.0f} s so far")
    return time.perf_counter() - began


def config(work: Path, rules: Path, evaluation: str, window: float) -> Path:
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump({
        "global": {"evaluation_interval": evaluation},
        "rule_files": [str(rules.resolve() / "*.rules.yml")],
        "storage": {"tsdb": {"out_of_order_time_window": f"{int(window)}s"}},
    }))
    return path


def _cpu_seconds(prom: Prometheus) -> float:
    text = http_get(prom.url + "/metrics").decode()
    return float(re.search(r"^process_cpu_seconds_total (\S+)$", text, re.M).group(1))


def measure(prom: Prometheus, evaluations: int, deadline: float) -> Dict[str, Dict]:
    """Per group: interval, the durations of up to ``evaluations`` evaluations, and each rule's summed time."""
    groups: Dict[str, Dict] = {}
    cpu = None  # (wall, CPU seconds) of the process at the first evaluation seen
    while not (groups and all(len(g["durations"]) >= evaluations for g in groups.values())):
        if time.time() > deadline:
            say("  the backfilled history ends: fewer evaluations than asked (raise --ahead)")
            break
        time.sleep(1.0)
        for g in prom.api("rules")["groups"]:
            key = f"{g['file']};{g['name']}"
            seen = groups.setdefault(key, {"name": g["name"], "last": None, "durations": [], "rules": {}})
            if g["lastEvaluation"] == seen["last"] or g["lastEvaluation"].startswith("0001"):
                continue
            seen["last"], seen["interval"] = g["lastEvaluation"], g["interval"]
            seen["durations"].append(g["evaluationTime"])
            if cpu is None:
                cpu = (time.time(), _cpu_seconds(prom))
            for rule in g["rules"]:
                seen["rules"][rule["name"]] = seen["rules"].get(rule["name"], 0.0) + rule["evaluationTime"]
    # Prometheus's own gauges, as the issue states the target. Wall-clock durations grow with the machine's load;
    # the CPU the process spent between the first and the last evaluation does not.
    text = http_get(prom.url + "/metrics").decode()
    if cpu is not None and time.time() > cpu[0]:
        groups["cpu_share"] = (_cpu_seconds(prom) - cpu[1]) / (time.time() - cpu[0])
    for metric, group, value in _SAMPLE.findall(text):
        if group in groups:
            groups[group]["last_duration" if "duration" in metric else "interval_metric"] = float(value)
    return groups


def table(title: str, groups: Dict[str, Dict], stats: Dict[str, float], top: int) -> List[str]:
    lines = [f"#### {title}", "",
             "| group | interval | first evaluation | last duration | max duration after the first | max % of interval "
             "| dominant rule (share) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    cpu_share = groups.pop("cpu_share", None)
    for g in groups.values():
        if not g["durations"]:
            continue
        interval = g["interval_metric"]
        # The first evaluation of a freshly started Prometheus reads the blocks' index and chunks from disk into
        # the page cache: shown apart, as a Prometheus that has run for a while does not pay it every time.
        first, rest = g["durations"][0], g["durations"][1:] or g["durations"]
        worst = max(rest)
        total = sum(g["rules"].values()) or 1.0
        rule, spent = max(g["rules"].items(), key=lambda kv: kv[1])
        lines.append(f"| {g['name']} | {interval:g} s | {first * 1e3:.1f} ms | {g['last_duration'] * 1e3:.1f} ms | "
                     f"{worst * 1e3:.1f} ms | {100 * worst / interval:.2f}% | `{rule}` ({100 * spent / total:.0f}%) |")
    for g in groups.values():
        ranked = sorted(g["rules"].items(), key=lambda kv: -kv[1])[:top if top > 1 else 0]
        total = sum(g["rules"].values()) or 1.0
        lines += [f"- {g['name']}: " + ", ".join(f"`{rule}` {100 * spent / total:.0f}%" for rule, spent in ranked)
                  ] if ranked else []
    counts = sorted({len(g["durations"]) for g in groups.values()})
    cpu = "" if cpu_share is None else f" Prometheus used {100 * cpu_share:.0f}% of one core meanwhile."
    lines += ["", f"Prometheus ready in {stats['ready_s']:.0f} s; {'-'.join(map(str, counts))} evaluations per "
                  f"group.{cpu}", ""]
    return lines


def bench(runs: int, args: argparse.Namespace, evaluation: str) -> List[str]:
    """Backfill once, then measure each rule folder on its own copy of the data."""
    hours, ahead = duration_seconds(args.hours), duration_seconds(args.ahead)
    start = float(int(time.time() - hours))
    say(f"{runs} runs x {args.ranks} ranks: {args.hours} of history and {args.ahead} ahead, "
        f"scraped every {args.scrape:g} s")
    with contextlib.ExitStack() as keep:
        if args.keep:  # reuse a kept backfill of this size while its history still reaches past now
            work = Path(args.keep) / f"{runs}x{args.ranks}"
            saved = work / "backfill" / "stats.json"
            stats = json.loads(saved.read_text()) if saved.exists() else None
            if stats and stats["end"] - ahead / 2 < time.time():
                shutil.rmtree(work)
                stats = None
            if stats:
                start, hours = stats["end"] - ahead, stats["end"] - ahead - stats["start"]
                say(f"  reusing the backfill in {work}: {(stats['end'] - time.time()) / 60:.0f} min of it left")
        else:
            work, stats = Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="rules-at-scale-",
                                                                              dir=args.workdir))), None
        if stats is None:
            work.mkdir(parents=True, exist_ok=True)
            templates = render(Path(args.corpus), start, hours + ahead, args.scrape)
            stats = backfill(templates, runs, args.ranks, work / "backfill")
            stats.update(start=start, end=start + hours + ahead)
            (work / "backfill" / "stats.json").write_text(json.dumps(stats))
        lines = [f"### {runs} runs x {args.ranks} ranks: {stats['series']:,} series, {stats['samples']:,} samples",
                 "",
                 f"OpenMetrics {stats['om_gb']:.2f} GB written in {stats['write_s']:.0f} s; promtool backfill "
                 f"{stats['promtool_s']:.0f} s into {stats['blocks_mb']:.0f} MB of blocks.", ""]
        # One Prometheus per rule folder, side by side on copies of the data: each evaluates its groups at the
        # same moments of the same history (and under the same load of the machine).
        with contextlib.ExitStack() as stack:
            proms = []
            for i, rules in enumerate(args.rules):
                here = work / f"rules-{i}"
                shutil.rmtree(here, ignore_errors=True)
                shutil.copytree(work / "backfill" / "prometheus-data", here / "prometheus-data")
                if args.recorded_history:
                    say(f"  recorded history of {rules}")
                    stats[f"recorded_s_{i}"] = backfill_recordings(here / "prometheus-data", Path(rules),
                                                                   stats["start"], time.time(), here / "levels")
                proms.append(stack.enter_context(Prometheus(config(here, Path(rules), evaluation, ahead + 600),
                                                            here)))
            began = time.perf_counter()
            for prom in proms:
                prom.wait_ready(timeout=600)
            stats["ready_s"] = time.perf_counter() - began
            say(f"  {len(proms)} Prometheus ready in {stats['ready_s']:.0f} s; waiting for {args.evaluations} "
                f"evaluations of every group")
            with ThreadPoolExecutor(len(proms)) as pool:
                measured = list(pool.map(lambda prom: measure(prom, args.evaluations, start + hours + ahead - 60),
                                         proms))
        for rules, groups in zip(args.rules, measured):
            lines += table(f"rules: {rules}", groups, stats, args.top)
    print("\n".join(lines), flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[10, 100, 1000], help="numbers of runs")
    parser.add_argument("--ranks", type=int, default=8, help="ranks (exporters) per run (default 8)")
    parser.add_argument("--hours", default="2h", help="history before now (default 2h)")
    parser.add_argument("--ahead", default="30m", help="history past now that keeps the runs live (default 30m)")
    parser.add_argument("--scrape", type=float, help="scrape interval in seconds (default: the training job's "
                                                     "in deploy/prometheus/prometheus.yml)")
    parser.add_argument("--evaluations", type=int, default=4, help="evaluations of every group (default 4)")
    parser.add_argument("--rules", nargs="+", default=[str(ROOT / "deploy" / "prometheus" / "rules")],
                        help="rule folders, each measured on the same backfilled data")
    parser.add_argument("--corpus", default=str(ROOT / "tests" / "corpus" / "corpus.yaml"))
    parser.add_argument("--recorded-history", action="store_true",
                        help="also backfill every recording rule's history (promtool tsdb create-blocks-from rules), "
                             "as a Prometheus that had evaluated the rules all along holds it")
    parser.add_argument("--top", type=int, default=1, help="list this many of each group's costliest rules")
    parser.add_argument("--keep", help="keep each backfill in this folder and reuse it on later runs while its "
                                       "history still reaches past now (for comparing rule versions)")
    parser.add_argument("--workdir", help="folder for the temporary data (default the system's temp folder)")
    args = parser.parse_args()
    deployed = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    evaluation = deployed["global"]["evaluation_interval"]
    if args.scrape is None:
        job = next(j for j in deployed["scrape_configs"] if j["job_name"] == "training")
        args.scrape = duration_seconds(job.get("scrape_interval", deployed["global"]["scrape_interval"]))
    version = subprocess.run([binary("prometheus"), "--version"], capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    header = [f"{time.strftime('%Y-%m-%d', time.gmtime())}, {cpu}, {os.cpu_count()} CPUs, "
              f"{(version.stdout or version.stderr).splitlines()[0]}; evaluation interval "
              f"{evaluation}, scrape interval {args.scrape:g} s", ""]
    out = list(header)
    for runs in args.runs:
        out += bench(runs, args, evaluation) + [""]
    print("\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
