"""training_eval_loss_noise: the noise of one evaluation, estimated by the exporter from each split's recent
evaluations, which the overfitting rule compares the val rise with."""
import math

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from conftest import value
from exporter.metrics import EVAL_NOISE_BEND as BEND, EVAL_NOISE_HISTORY as HISTORY, EVAL_NOISE_MIN as MIN_EVALS


def reference(losses, order=1):
    """The estimate from its definition: the sample variance of the differences of ``order``, over the variance
    they give independent noise of deviation 1 (2 at order 1, 6 at order 2), rooted."""
    return math.sqrt(np.var(np.diff(np.asarray(losses, dtype=float), order), ddof=1) / math.comb(2 * order, order))


def noise(registry, split="val"):
    return value(registry, "training_eval_loss_noise", split=split)


def test_absent_until_enough_evaluations_then_the_spread_of_the_latest(make_exporter, registry):
    exp = make_exporter()
    losses = [0.9, 0.82, torch.tensor(0.85), 0.79, 0.8, 0.74, torch.tensor(0.77), 0.71, 0.75, torch.tensor(0.7)]
    for k, loss in enumerate(losses, 1):
        exp.log_eval("val", loss=loss)
        got = noise(registry)  # a scrape: tensor losses arrive through the exporter's device reader
        if k < MIN_EVALS:
            assert got is None
        else:
            assert got == pytest.approx(reference([float(x) for x in losses[:k]]), rel=1e-6)
    # Each split has its own.
    test = [2.0, 2.1, 1.9, 2.0, 2.2, 1.95, 2.05, 2.1]
    for loss in test:
        exp.log_eval("test", loss=loss)
    assert noise(registry, "test") == pytest.approx(reference(test))
    assert noise(registry) == pytest.approx(reference([float(x) for x in losses[-HISTORY:]]), rel=1e-6)


def test_a_steady_trend_is_not_noise(make_exporter, registry):
    rng = np.random.default_rng(3)
    wobble = rng.normal(0, 0.01, HISTORY)
    flat = make_exporter(run="flat")
    rising = make_exporter(run="rising")
    for i, w in enumerate(wobble):
        flat.log_eval("val", loss=1.0 + w)
        rising.log_eval("val", loss=1.0 + 0.05 * i + w)  # a rise of 5 noise deviations per evaluation
    flat_noise = value(registry, "training_eval_loss_noise", run="flat", split="val")
    assert value(registry, "training_eval_loss_noise", run="rising", split="val") == pytest.approx(flat_noise, rel=1e-6)
    # A pure line has no noise at all.
    line = make_exporter(run="line")
    for i in range(HISTORY):
        line.log_eval("val", loss=2.0 - 0.125 * i)
    assert value(registry, "training_eval_loss_noise", run="line", split="val") == pytest.approx(0.0, abs=1e-12)


def test_estimates_the_standard_deviation_of_one_evaluation(make_exporter, registry):
    # Evaluations of a val loss that first falls and then rises, with noise of 0.02: over many evaluations the
    # published estimate centres on 0.02 (each one comes from only the latest evaluations).
    exp = make_exporter()
    rng = np.random.default_rng(7)
    estimates = []
    for i in range(3000):
        exp.log_eval("val", loss=1.0 + 0.5 * math.exp(-i / 300) + 1e-4 * i + rng.normal(0, 0.02))
        if i >= HISTORY:
            estimates.append(noise(registry))
    assert np.mean(estimates) == pytest.approx(0.02, rel=0.05)


def test_memory_is_bounded_to_the_latest_evaluations(make_exporter, registry):
    exp = make_exporter()
    rng = np.random.default_rng(11)
    for loss in rng.normal(0, 50.0, 1000):  # wild evaluations long ago weigh nothing
        exp.log_eval("val", loss=float(loss))
    calm = list(1.0 + rng.normal(0, 0.01, HISTORY))
    for loss in calm:
        exp.log_eval("val", loss=loss)
    assert noise(registry) == pytest.approx(reference(calm), rel=1e-9)
    assert len(exp.state._eval_history["val"]) == HISTORY


def test_a_non_finite_evaluation_is_left_out(make_exporter, registry):
    exp = make_exporter()
    finite = [1.0, 0.9, 0.95, 0.85, 0.88, 0.8, 0.83, 0.78]
    for loss in finite[:3] + [float("nan")] + finite[3:5] + [float("inf")] + finite[5:]:
        exp.log_eval("val", loss=loss)
    assert noise(registry) == pytest.approx(reference(finite))
    assert value(registry, "training_evals_total", split="val") == 10
    # The NaN alone: published as the latest loss, and the estimate still stands.
    exp.log_eval("val", loss=torch.tensor(float("nan")))
    assert math.isnan(value(registry, "training_loss", split="val"))
    assert noise(registry) == pytest.approx(reference(finite))


def test_a_new_process_starts_without_an_estimate(make_exporter, registry):
    # A resumed run is a new process: its history is empty (the rule keeps the run's last estimate meanwhile).
    first = make_exporter(run="resumed")
    for loss in (1.0, 0.9, 0.95, 0.85, 0.88, 0.8, 0.83, 0.78):
        first.log_eval("val", loss=loss)
    assert value(registry, "training_eval_loss_noise", run="resumed", split="val") is not None
    first.close(stop_server=True)
    fresh = CollectorRegistry()
    second = make_exporter(run="resumed", registry=fresh)
    second.log_eval("val", loss=0.84)
    assert fresh.get_sample_value("training_eval_loss_noise", {"run": "resumed", "rank": "0", "split": "val"}) is None


def test_a_bend_between_far_apart_evaluations_is_not_taken_for_noise(make_exporter, registry):
    # One val curve (falling fast, then turning up: a mild overfit) with noise 0.01, evaluated at two cadences.
    # Every 100 minutes the bend dominates the successive differences: the order-1 estimate reads several times
    # the noise, so nothing is published and the rule keeps the train-noise margin. Every 5 minutes the same
    # curve is straight between evaluations and the estimate is published.
    rng = np.random.default_rng(5)
    curve = lambda h: 0.6 + 1.9 * math.exp(-h / 3) + 0.07 * max(0.0, h - 8)  # noqa: E731
    sparse, dense = make_exporter(run="sparse"), make_exporter(run="dense")
    sparse_losses = [curve(k * 100 / 60) + rng.normal(0, 0.01) for k in range(1, 10)]
    for loss in sparse_losses:
        sparse.log_eval("val", loss=loss)
    assert reference(sparse_losses) > 5 * 0.01  # what would have been published
    assert value(registry, "training_eval_loss_noise", run="sparse", split="val") is None
    dense_losses = [curve(8 + k / 12) + rng.normal(0, 0.01) for k in range(1, 17)]
    for loss in dense_losses:
        dense.log_eval("val", loss=loss)
    published = value(registry, "training_eval_loss_noise", run="dense", split="val")
    assert published == pytest.approx(reference(dense_losses))
    assert 0.005 < reference(dense_losses) < 0.02


def test_kept_once_published(make_exporter, registry):
    # Shown once to be noise, the estimate stays published when the curve later bends within the history (it
    # then reads high, which only makes the rule quieter), so the rule does not flip between its two margins.
    exp = make_exporter()
    rng = np.random.default_rng(9)
    losses = list(1.0 + rng.normal(0, 0.01, HISTORY))
    for loss in losses:
        exp.log_eval("val", loss=loss)
    assert noise(registry) == pytest.approx(reference(losses))
    for k in range(1, 6):
        losses.append(1.0 + 0.02 * k * k)
        exp.log_eval("val", loss=losses[-1])
    recent = losses[-HISTORY:]
    assert reference(recent) > BEND * reference(recent, 2)
    assert noise(registry) == pytest.approx(reference(recent))
