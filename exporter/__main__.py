"""Command line: ``python -m exporter {demo,rules,...}``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, List, Optional


def _demo(args: argparse.Namespace) -> int:
    from .stack import demo

    return demo.main(args.scenario, steps=args.steps, step_time=args.step_time, eval_every=args.eval_every,
                     run=args.run, port=args.port, addr=args.addr, linger=args.linger,
                     max_window=args.max_window)


def _rules(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .ops.rules import render_prometheus_rule, write
    from .ops.thresholds import Thresholds, ThresholdsError

    try:
        paths = write(Path(args.thresholds), Path(args.out))
        if args.prometheusrule:
            path = Path(args.prometheusrule)
            path.write_text(render_prometheus_rule(Thresholds.load(Path(args.thresholds))))
            paths.append(path)
    except (OSError, ThresholdsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def _stack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .stack import showcase

    return showcase.main(duration=args.duration, workdir=Path(args.workdir), steps=args.steps)


def _dashboards(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .ops.dashboards import write

    for path in write(Path(args.thresholds), Path(args.out)):
        print(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .ops import report
    from .ops.thresholds import Thresholds, duration_seconds

    try:
        path = report.main(args.prometheus, args.run, Thresholds.load(Path(args.thresholds)), out=Path(args.out),
                           since=duration_seconds(args.since), job=args.job)
    except (LookupError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _check_alertmanager(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .ops import alertmanager

    try:
        return alertmanager.main(Path(args.config), Path(args.thresholds), args.mount)
    except (OSError, ValueError) as exc:  # ThresholdsError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _scorecard(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from .ops import scorecard

    return scorecard.main(Path(args.corpus), args.out and Path(args.out), thresholds=Path(args.thresholds),
                          rule_dir=args.rules and Path(args.rules), half=args.half, title=args.title,
                          command="python -m exporter " + shlex.join(sys.argv[1:]))


def _number(kind: type, low: float, high: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: a ``kind`` number within [low, high], refused with a one-line error otherwise."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}")
        if not low <= value <= high:
            bound = f"at least {low:g}" if high == float("inf") else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"{value:g} is out of range: expected {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _duration(text: str) -> str:
    from .ops.thresholds import duration_seconds

    try:
        seconds = duration_seconds(text)
    except (ValueError, TypeError):
        seconds = None
    if not seconds:
        raise argparse.ArgumentTypeError(f"not a positive Prometheus duration such as 30m or 2h: {text!r}")
    return text


def _url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r} (e.g. http://localhost:9090)")
    return text


def _simulate(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .ops.scorecard import load_corpus
    from .ops.simulate import openmetrics_text

    runs = {run.name: run for run in load_corpus(Path(args.corpus))}
    if args.run not in runs:
        print(f"error: no run {args.run!r} in {args.corpus}", file=sys.stderr)
        return 2
    labels = {"job": "training", "instance": "node-1:9945"}
    for pair in args.label:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            print(f"error: --label wants NAME=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        labels[key] = value
    run = runs[args.run]
    start = args.start if args.start is not None else time.time() - run.duration  # the run ends now
    Path(args.out).write_text(openmetrics_text(run, round(start), labels))
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .stack.demo import SCENARIOS

    parser = argparse.ArgumentParser(prog="python -m exporter",
                                     description="Prometheus exporter for PyTorch training jobs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a real small training (CPU, synthetic data) with the exporter",
                          description="Train a small MLP on synthetic data with the exporter serving /metrics. "
                                      "Scenarios: " + "; ".join(f"{k}: {v.description}" for k, v in SCENARIOS.items()))
    demo.add_argument("--scenario", choices=sorted(SCENARIOS), default="healthy")
    demo.add_argument("--steps", type=_number(int, 1), default=1200, help="optimizer steps (default 1200)")
    demo.add_argument("--step-time", type=_number(float, 0), default=0.05,
                      help="minimum seconds per step, to pace the run like a real job (default 0.05)")
    demo.add_argument("--eval-every", type=_number(int, 1), default=50, help="steps between evaluations (default 50)")
    demo.add_argument("--run", help="run id (default demo-SCENARIO)")
    demo.add_argument("--port", type=_number(int, 0, 65535), help="port to serve on (default 9945 or TRAINING_EXPORTER_PORT; 0: any)")
    demo.add_argument("--addr", help="address to bind (default 0.0.0.0 or TRAINING_EXPORTER_ADDR)")
    demo.add_argument("--linger", type=_number(float, 0), default=0.0,
                      help="seconds to keep serving after the run ended, so Prometheus scrapes the end")
    demo.add_argument("--max-window", type=_number(float, 0.001), default=60.0,
                      help="seconds the exporter keeps a step's maximum loss and gradient norm (default 60)")
    demo.set_defaults(func=_demo)

    stack = sub.add_parser("stack", help="the local demo: Prometheus, Alertmanager and a training run per pathology",
                           description="Start Prometheus, Alertmanager and Pushgateway on loopback with the "
                                       "repository's configuration (demo-speed thresholds), run a healthy training "
                                       "run and one per pathology side by side, and print the alerts as they "
                                       "arrive and a summary. With a terminal and no --duration it keeps the "
                                       "stack up until Ctrl-C; otherwise it ends by itself.")
    stack.add_argument("--duration", type=_number(float, 1), help="end after this many seconds at most (default: when every "
                                                      "expected alert arrived, at most 600 s)")
    stack.add_argument("--workdir", default=".demo", help="folder for every file the demo writes (default .demo)")
    stack.add_argument("--steps", type=_number(int, 1), default=3000, help="steps of each training run (default 3000)")
    stack.set_defaults(func=_stack)

    rep = sub.add_parser("report", help="draw a run's learning curves to PNG from Prometheus (needs matplotlib)",
                         description="Render the main panels of the run dashboard to one PNG from Prometheus's "
                                     "range queries, x-axis in optimizer steps.")
    rep.add_argument("--prometheus", required=True, type=_url, help="Prometheus URL, e.g. http://localhost:9090")
    rep.add_argument("--run", required=True, help="the run to draw")
    rep.add_argument("--since", default="1h", type=_duration, help="time range ending now, a Prometheus duration (default 1h)")
    rep.add_argument("--job", default=".+", help="regex of the scrape job (default any)")
    rep.add_argument("--out", default=".", help="folder for RUN.png (default the current folder)")
    rep.add_argument("--thresholds", default="deploy/prometheus/thresholds.yaml",
                     help="thresholds YAML, for the alerts' thresholds drawn (default %(default)s)")
    rep.set_defaults(func=_report)

    rules = sub.add_parser("rules", help="generate the Prometheus recording and alerting rules from a thresholds file")
    rules.add_argument("--thresholds", required=True, help="thresholds YAML (deploy/prometheus/thresholds.yaml)")
    rules.add_argument("--out", required=True, help="folder to write the rule files into")
    rules.add_argument("--prometheusrule", help="also write the rules as a prometheus-operator PrometheusRule "
                                               "manifest to this file")
    rules.set_defaults(func=_rules)

    boards = sub.add_parser("dashboards", help="generate the Grafana dashboards (needs the dashboards extra)")
    boards.add_argument("--thresholds", default="deploy/prometheus/thresholds.yaml",
                        help="thresholds YAML, for the thresholds the panels draw (default %(default)s)")
    boards.add_argument("--out", default="grafana/dashboards", help="folder for the JSON files (default %(default)s)")
    boards.set_defaults(func=_dashboards)

    check = sub.add_parser("check-alertmanager", help="check an Alertmanager configuration before it starts: "
                                                      "routing as the thresholds say, every secret file present",
                           description="Exit 1 when the configuration's route or inhibit_rules differ from what the "
                                       "thresholds file's identity labels and fleet window give, or when a secret "
                                       "file it references (api_url_file, password_file, ...) is missing or empty: "
                                       "Alertmanager would start and fail every send through it.")
    check.add_argument("--config", default="deploy/alertmanager/alertmanager.yml", help="default %(default)s")
    check.add_argument("--thresholds", default="deploy/prometheus/thresholds.yaml", help="default %(default)s")
    check.add_argument("--mount", action="append", default=[], metavar="CONTAINER_DIR=LOCAL_DIR",
                       help="where a folder the configuration names lies here, as a container mounts it "
                            "(e.g. /etc/alertmanager=deploy/alertmanager); repeatable")
    check.set_defaults(func=_check_alertmanager)

    card = sub.add_parser("scorecard", help="score the rules on the detection corpus (recall, false alarms, delays)",
                          description="Drive the real exporter through every corpus run on a simulated clock, replay "
                                      "what Prometheus would have scraped through promtool against the rules, and "
                                      "write the scorecard as Markdown.")
    card.add_argument("--corpus", default="tests/corpus/corpus.yaml", help="corpus file (default %(default)s)")
    card.add_argument("--thresholds", default="deploy/prometheus/thresholds.yaml",
                      help="thresholds YAML the rules are generated from (default %(default)s)")
    card.add_argument("--rules", help="score the rule files in this folder instead")
    card.add_argument("--half", choices=("tuning", "held-out"), help="only this half (default both)")
    card.add_argument("--title", default="Detection scorecard", help="the Markdown title")
    card.add_argument("--out", help="Markdown file to write (default: print)")
    card.set_defaults(func=_scorecard)

    sim = sub.add_parser("simulate", help="write what Prometheus would have scraped from one corpus run",
                         description="Drive the real exporter through a corpus run on a simulated clock and write "
                                     "every sample it served at each scrape, for `promtool tsdb "
                                     "create-blocks-from openmetrics`.")
    sim.add_argument("--corpus", default="tests/corpus/corpus.yaml", help="corpus file (default %(default)s)")
    sim.add_argument("--run", required=True, help="the corpus run")
    sim.add_argument("--format", choices=("openmetrics",), default="openmetrics", help="output format (default "
                                                                                        "%(default)s)")
    sim.add_argument("--start", type=float, help="Unix time of the run's start (default: the run ends now)")
    sim.add_argument("--label", action="append", default=[], metavar="NAME=VALUE",
                     help="a label on every series, e.g. namespace=team-a; repeatable (job=training and "
                          "instance=node-1:9945 unless given)")
    sim.add_argument("--out", required=True, help="file to write")
    sim.set_defaults(func=_simulate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .ops.thresholds import ThresholdsError

    try:
        return args.func(args)
    except ThresholdsError as exc:  # a bad thresholds file: one line naming the key, for every command
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
