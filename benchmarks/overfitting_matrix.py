"""TrainingOverfitting over a matrix of evaluation noise, generalization gap and evaluation cadence, printed as a
table: for each cell, a healthy run (the alerts it raised, which should be none) and the same run overfitting
(how long after the onset TrainingOverfitting fired, in minutes and evaluations).

    python benchmarks/overfitting_matrix.py [--rules deploy/prometheus/rules] [--workers 2]

Each run is the real exporter driven on a simulated clock (``exporter.ops.simulate``, as the corpus scorecard
does) and replayed through promtool against the rule files in ``--rules``. The train loss has a step noise of
0.1; an evaluation's noise is 0.1x, 1x or 3x that (many batches; a few batches; fewer samples than a train
batch), with no gap or a gap of 0.2 between val and train. The overfitting run's val loss rises from the onset
by twenty evaluation deviations (at least 0.3) over 3 hours while the train loss keeps falling (the learning
rate's cosine lowers both curves by up to 0.2 over the run). Cadences: one step
a second evaluated every 100 s, one step a minute evaluated every 10 minutes, and every 3 hours (fewer cells:
each takes minutes).
"""
import argparse
import concurrent.futures
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.ops import scorecard  # noqa: E402
from exporter.ops.simulate import Run  # noqa: E402

# name, rate, eval, duration, tau of the loss curve, onset of the overfitting
CADENCES = (("1/s, eval 100 s", "1/s", "100", "6h", "40m", "2h30m"),
            ("1/min, eval 10 min", "1/min", "10", "16h", "3h", "9h"),
            ("1/min, eval 3 h", "1/min", "3h", "27h", "4h", "12h"))
RATIOS = (0.1, 1.0, 3.0)
GAPS = (0.0, 0.1)
STEP_NOISE = 0.05  # in loss scales: the curve falls from 3 to 1, so 0.1


def cells():
    """(cadence, ratio, gap) of every cell; the 3-hourly cadence only at the extreme ratios with a gap."""
    for cadence in CADENCES:
        for ratio in RATIOS:
            for gap in GAPS:
                if cadence[2] == "3h" and (ratio == 1.0 or gap == 0.0):
                    continue
                yield cadence, ratio, gap


def runs(cadence, ratio, gap, seed):
    label, rate, every, duration, tau, onset = cadence
    loss = {"start": 3.0, "end": 1.0, "tau": tau, "noise": STEP_NOISE, "gap": gap, "eval_noise": ratio * STEP_NOISE}
    base = {"half": "matrix", "seed": seed, "rate": rate, "scrape": "60s", "eval": every, "duration": duration,
            "loss": loss, "schedule": {"kind": "cosine", "lr": 1e-3}}
    name = f"m{seed}"
    rise = max(0.15, 20 * ratio * STEP_NOISE)
    overfit = {"kind": "overfit", "strength": "mild", "at": onset, "rise": rise, "over": "3h"}
    return (Run.from_dict({**base, "name": name + "-healthy"}),
            Run.from_dict({**base, "name": name + "-overfit", "pathology": overfit}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=Path, default=ROOT / "deploy" / "prometheus" / "rules")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    import logging
    logging.getLogger("exporter").setLevel(logging.WARNING)
    table = list(cells())
    todo = [run for k, cell in enumerate(table) for run in runs(*cell, seed=300 + k)]
    began = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = {r.run.name: scorecard.score(r) for r in pool.map(scorecard.replay, todo, [args.rules] * len(todo))}
    print(f"rules: {args.rules}; {len(todo)} runs in {time.perf_counter() - began:.0f} s\n")
    print("| cadence | eval noise / step noise | gap | healthy run: alerts | overfitting run: TrainingOverfitting after "
          "the onset | other alerts of the overfitting run |")
    print("| --- | --- | --- | --- | --- | --- |")
    false_alarms = missed = 0
    delays = []
    for k, (cadence, ratio, gap) in enumerate(table):
        healthy, overfit = (results[f"m{300 + k}-{kind}"] for kind in ("healthy", "overfit"))
        raised = sorted({a for (a, severity, _), _t in healthy.first.items() if severity != "info"})
        false_alarms += bool(raised)
        if overfit.delay is None:
            found = "missed"
            missed += 1
        else:
            delays.append(overfit.delay / 60)
            found = f"{overfit.delay / 60:.0f} min, {overfit.delay / overfit.run.eval_interval:.1f} evals"
        early = any(x.startswith("TrainingOverfitting") for x in overfit.false_alarms)
        others = sorted({a for (a, severity, _), _t in overfit.first.items()
                         if severity != "info" and a != "TrainingOverfitting"})
        print(f"| {cadence[0]} | {ratio:g} | {2 * gap:g} | {', '.join(raised) or 'none'} | {found}"
              f"{' (also before the onset)' if early else ''} | {', '.join(others) or 'none'} |")
    print(f"\nhealthy runs with an alert: {false_alarms}/{len(table)}; overfitting runs missed: {missed}/{len(table)}; "
          f"median delay {sorted(delays)[len(delays) // 2] if delays else float('nan'):.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
