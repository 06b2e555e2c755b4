"""The detection corpus and its generator: the series are what the real exporter serves on a simulated clock,
the corpus covers what the corpus issue lists, and a replay through promtool scores the committed rules."""
import json
import math
from pathlib import Path

import pytest

from exporter.ops import scorecard
from exporter.ops.simulate import Run, curves, lifecycle_series, scrape_series

CORPUS = Path(__file__).resolve().parent / "corpus" / "corpus.yaml"
RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules"
THRESHOLDS = RULES.parent / "thresholds.yaml"


def run(**over):
    spec = {"name": "g", "half": "tuning", "seed": 1, "rate": "1/s", "scrape": "15s", "eval": "100",
            "duration": "20m", "loss": {"start": -1.0, "end": -3.0, "tau": "5m", "noise": 0.1},
            "schedule": {"kind": "constant", "lr": 1e-3}}
    spec.update(over)
    return Run.from_dict(spec)


def key(series, name):
    return next(k for k in series if k.startswith(name if "{" in name else name + "{"))


def test_series_are_the_exporters_exposition_at_each_scrape():
    r = run()
    s = scrape_series(r)
    c = curves(r)
    assert len(s[key(s, "training_step")]) == 20 * 4 + 1  # a scrape at 0 s, then every 15 s
    steps = s[key(s, "training_loss_steps_total")]
    assert steps[-1] == 1200 and steps[4] == 61  # the steps at 0..60 s by the scrape at 60 s
    # Sign-split sums: the mean of those steps' losses is what the exporter's counters give.
    pos, neg = s[key(s, "training_loss_positive_sum_total")], s[key(s, "training_loss_negative_sum_total")]
    assert (pos[4] - neg[4]) / steps[4] == pytest.approx(c["loss"][:61].mean(), rel=1e-6)
    assert s[key(s, 'training_eval_loss_best')][-1] < -2.5
    assert s["up{}"] == [1.0] * 81


def test_gap_restart_and_finish_are_what_prometheus_sees():
    gap = scrape_series(run(events={"gap": ["5m", "10m"]}))
    step = gap[key(gap, "training_step")]
    assert step[19] is not None and step[20:40] == [None] * 20 and step[40] is not None
    restart = scrape_series(run(events={"restart": "10m"}))
    steps = restart[key(restart, "training_loss_steps_total")]
    assert steps[39] == 586 and steps[40] is None and steps[45] == 16  # a new process from 11:00 on
    assert restart[key(restart, "training_step")][-1] == 1200  # the global step resumes
    done = scrape_series(run(events={"finish": "15m"}))
    completed = done[key(done, 'training_run_status{rank="0",run="g",status="completed"')]
    assert completed[60] == 1.0 and completed[61] is None and done["up{}"][61:] == [0.0] * 20


def test_pathologies_change_the_curves_from_their_onset():
    nan = curves(run(pathology={"kind": "nan", "at": "10m", "steps": 3}))
    assert [math.isnan(x) for x in nan["loss"][599:603]] == [False, True, True, True]
    burst = curves(run(pathology={"kind": "explode", "at": "10m", "factor": 1000, "burst": "1m"}))
    assert burst["grad"][600:660].min() > 100 * burst["grad"][:600].max() / 10


def test_corpus_covers_what_the_issue_lists():
    runs = scorecard.load_corpus(CORPUS)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    for half in ("tuning", "held-out"):
        mine = [r for r in runs if r.half == half]
        for kind in scorecard.ALERT_OF:
            strengths = {r.pathology["strength"] for r in mine if r.pathology and r.pathology["kind"] == kind}
            assert strengths == {"strong", "mild"}, (half, kind)
        assert {r.schedule.get("kind") for r in mine if not r.pathology} >= {"cosine", "wsd", "step", "restarts"}
        assert any(r.loss.get("end", 1) < 0 for r in mine if not r.pathology)  # negative losses
        assert any(abs(r.loss.get("start", 1)) < 0.5 and r.loss.get("noise", 0) >= 3
                   for r in mine if not r.pathology)  # RL-like
        assert any(r.recorded for r in mine)  # real trainings
        assert {"gap", "restart", "finish"} <= {e for r in mine for e in r.events}
        assert any(r.twin for r in mine)
    assert {r.rate for r in runs} == {1 / 60, 1.0, 50.0}
    assert {r.scrape for r in runs} == {15.0, 60.0}
    assert {r.eval_steps for r in runs} >= {100} and 3 * 3600 in {r.eval_seconds for r in runs}
    # the halves differ in seeds
    assert not {r.seed for r in runs if r.half == "tuning"} & {r.seed for r in runs if r.half == "held-out"}


def test_real_trainings_are_replayed_as_recorded():
    runs = [r for r in scorecard.load_corpus(CORPUS) if r.recorded]
    assert {r.pathology and r.pathology["kind"] for r in runs} == {None, "diverge", "overfit"}
    for r in runs:
        rec = json.loads(r.recorded.read_text())
        if r.pathology:  # the corpus's onset is the recording's
            assert r.onset == rec["onset_step"] / r.rate, r.name
    r = next(r for r in runs if r.pathology is None)
    rec, s = json.loads(r.recorded.read_text()), scrape_series(r)
    steps = s[key(s, "training_loss_steps_total")]
    assert steps[-1] == rec["steps"] and steps[4] == 61  # every recorded step, 60 s in at one step a second
    pos, neg = s[key(s, "training_loss_positive_sum_total")], s[key(s, "training_loss_negative_sum_total")]
    assert pos[4] - neg[4] == pytest.approx(sum(rec["loss"][:61]), rel=1e-6)
    assert s[key(s, "training_eval_loss_best")][-1] == pytest.approx(min(rec["eval_loss"]))
    accuracy = next(v for k, v in s.items() if k.startswith("training_eval_metric{") and 'metric="accuracy"' in k)
    # Evaluations every 100 s from 100 s on: the hour's last is the recording's evaluation at step 3500.
    assert accuracy[-1] == pytest.approx(rec["eval_accuracy"][rec["eval_step"].index(3500)])


REPLAYED = ("h-nan-mild-gap-1s", "h-spike-strong-neg-1min", "h-gap-1min", "h-diverge-strong-3h-1min")


def test_held_out_runs_replayed_through_promtool_score_the_committed_rules():
    runs = [r for r in scorecard.load_corpus(CORPUS) if r.name in REPLAYED]
    results = {r.run.name: r for r in scorecard.run_corpus(runs, RULES)}
    for name, r in results.items():
        print(name, r.expected, r.delay, r.false_alarms)
    assert results["h-nan-mild-gap-1s"].detected  # NaNs during a Prometheus outage
    assert results["h-spike-strong-neg-1min"].detected and not results["h-spike-strong-neg-1min"].false_alarms
    assert results["h-gap-1min"].false_alarms == []
    twin = results["h-diverge-strong-3h-1min"]
    assert twin.detected and twin.false_alarms == []  # the same run name in namespace ns-b stays quiet


# ------------------------------------------------------------------------------------------------ lifecycle
LIFECYCLE_KINDS = {  # what the lifecycle issue lists, and how a row says it
    "clean exit": lambda r: "finish" in r.events,
    "resume elsewhere": lambda r: "resume" in r.events and r.events["resume"].get("instance", "") != "node-1:9945",
    "node reuse": lambda r: "reuse" in r.events,
    "crash": lambda r: "crash" in r.events and not {"resume", "reuse"} & set(r.events) and not r.twin,
    "preemption": lambda r: "preempt" in r.events or "preempt_unscraped" in r.events,
    "18-minute checkpoint": lambda r: r.events.get("checkpoint", [None, None])[1] == "18m",
    "slow start-up": lambda r: "startup" in r.events,
    "same name in two namespaces": lambda r: bool(r.twin),
}


def test_lifecycle_rows_cover_the_issue_in_both_halves():
    rows = scorecard.load_lifecycle(CORPUS)
    names = [r.name for r in rows] + [r.name for r in scorecard.load_corpus(CORPUS)]
    assert len(set(names)) == len(names)
    for half in ("tuning", "held-out"):
        mine = [r for r in rows if r.half == half]
        for kind, has in LIFECYCLE_KINDS.items():
            assert any(has(r) for r in mine), (half, kind)
    tuning = {r.name[2:]: r for r in rows if r.half == "tuning"}
    for r in rows:
        if r.half == "held-out":  # the held-out twin of each tuning row has another seed and cadence
            twin = next(t for name, t in tuning.items() if name.rsplit("-", 1)[0] in r.name)
            assert r.seed != twin.seed and (r.rate, r.scrape) != (twin.rate, twin.scrape), r.name


def lc(**over):
    return run(**{"rate": "1/min", "scrape": "60s", "duration": "1h", **over})


def status(targets, instance, run_name, state):
    series = targets[instance]
    return series.get(f'training_run_status{{rank="0",run="{run_name}",status="{state}"}}')


def test_lifecycle_events_are_what_prometheus_sees_from_each_target():
    crash = scrape_series_of(events={"crash": "20m"})
    assert crash["node-1:9945"]["up{}"][19:22] == [1.0, 0.0, 0.0]  # nothing answers from the crash on
    assert status(crash, "node-1:9945", "g", "running")[19:21] == [1.0, None]
    preempt = scrape_series_of(events={"preempt": "20m", "resume": {"after": "10m", "instance": "node-2:9945"}})
    # A real SIGTERM: "interrupted" served at the next scrape, then the process exits; the run resumes elsewhere.
    assert status(preempt, "node-1:9945", "g", "interrupted")[19:22] == [0.0, 1.0, None]
    assert preempt["node-1:9945"]["up{}"][21] == 0.0
    back = status(preempt, "node-2:9945", "g", "running")
    assert back[29] is None and back[30] == 1.0  # the resumed process is scraped from minute 30
    steps = preempt["node-2:9945"]['training_step{rank="0",run="g"}']
    assert steps[-1] == 20 + (60 - 32) + 1  # the global step goes on from where the preempted process left it
    reuse = scrape_series_of(events={"crash": "20m", "reuse": {"after": "2m", "run": "other"}})
    assert reuse["node-1:9945"]["up{}"][19:24] == [1.0, 0.0, 0.0, 1.0, 1.0]  # the same target, another run
    assert status(reuse, "node-1:9945", "other", "running")[22] == 1.0
    unscraped = scrape_series_of(events={"preempt_unscraped": "20m"})
    assert status(unscraped, "node-1:9945", "g", "interrupted")[19:21] == [0.0, None]
    saving = scrape_series_of(events={"checkpoint": ["20m", "18m"]})["node-1:9945"]
    phase = saving['training_phase_start_timestamp_seconds{phase="checkpoint",rank="0",run="g"}']
    assert phase[19] is None and phase[20:38] == [1200.0] * 18 and phase[38] is None


def scrape_series_of(**over):
    return lifecycle_series(lc(**over))


# The rows at one step a minute (cheap to generate); `python -m exporter scorecard` replays them all.
LIFECYCLE_REPLAYED = ("t-lc-crash-1min", "t-lc-two-namespaces-1min", "h-lc-node-reuse-1min",
                      "h-lc-resume-elsewhere-late-1min", "t-lc-preempt-resumed-1min", "t-lc-checkpoint-18m-1min")


def test_lifecycle_rows_replayed_through_promtool_pass_with_the_committed_rules():
    rows = [r for r in scorecard.load_lifecycle(CORPUS) if r.name in LIFECYCLE_REPLAYED]
    results = {r.run.name: r for r in scorecard.run_lifecycle(rows, RULES)}
    print("\n".join(scorecard.lifecycle_table(list(results.values()))))
    assert sorted(results) == sorted(LIFECYCLE_REPLAYED)
    assert [name for name, r in results.items() if not r.ok] == []
    crash = results["t-lc-crash-1min"]
    assert [k[0] for k in crash.fired] == ["TrainingTargetDown"] and crash.at_end  # not resolved by itself
    assert {k[2] for k in results["t-lc-two-namespaces-1min"].fired} == {"ns-a"}  # the healthy twin is quiet
    assert {k[3] for k in results["h-lc-node-reuse-1min"].fired} == {"h-lc-node-reuse-1min"}
    late = results["h-lc-resume-elsewhere-late-1min"]
    assert late.fired and not late.after_return  # alerted while away, resolved once back


def test_lifecycle_verdict_fails_when_a_phase_allowance_is_too_short(tmp_path):
    """The scorecard can fail: with a 10-minute checkpoint allowance the 18-minute checkpoint is a hang."""
    variant = tmp_path / "thresholds.yaml"
    variant.write_text(f"extends: {THRESHOLDS}\nalerts:\n  TrainingHung:\n"
                       "    phases: {startup: 1h, checkpoint: 10m}\n")
    rules = scorecard.rule_dir_from(variant, tmp_path / "rules")
    row = next(r for r in scorecard.load_lifecycle(CORPUS) if r.name == "t-lc-checkpoint-18m-1min")
    result = scorecard.replay_lifecycle(row, rules)
    assert not result.ok and [k[0] for k in result.fired] == ["TrainingHung"], result.problems
