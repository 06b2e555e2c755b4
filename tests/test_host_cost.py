"""Host cost per step: aten ops the exporter dispatches, fused clipping, torch.compile, edge values of the totals."""
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import exporter
from exporter import TrainingExporter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dispatch_count import exporter_ops, snapshot_ops  # noqa: E402


def _value(registry, name, **labels):
    return registry.get_sample_value(name, {"run": "host", "rank": "0", **labels})


@pytest.fixture
def make(registry):
    made = []

    def make(**kwargs):
        exp = TrainingExporter(run="host", port=0, addr="127.0.0.1", registry=registry, handle_sigterm=False,
                               **kwargs)
        made.append(exp)
        return exp

    yield make
    for exp in made:
        exp.close(stop_server=True)


# ------------------------------------------------------------------------------------ ops per step
def test_ops_per_step_are_few_and_independent_of_the_number_of_tensors():
    """watch(model, optimizer) + log_step(loss=tensor): the same count at 10 and 1,000 parameter tensors, <= 12."""
    small, _ = exporter_ops(10, "defaults")
    large, per_op = exporter_ops(1000, "defaults")
    assert small == large, per_op
    assert 0 < large <= 12, per_op
    # The fused clip feeds the norm: the exporter adds only the writes of the loss and the norm.
    assert exporter_ops(10, "fused clip")[0] == exporter_ops(1000, "fused clip")[0] <= 4
    # A snapshot reduces every row at once: a constant number of ops, whatever the steps or tensors.
    assert snapshot_ops(10) == snapshot_ops(1000) > 0


def test_the_ring_folds_when_full_and_loses_nothing(make, registry):
    """More steps than the ring holds between two snapshots: every step is counted once, the spike is kept."""
    exp = make()
    exp._totals._period = float("inf")  # no snapshot from the training thread after the first step
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    exp.watch(model, optimizer)
    losses = [float(i % 7) for i in range(600)]
    losses[333] = 1e6
    losses[444] = float("nan")
    for loss in losses:
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        exp.log_step(loss=torch.tensor(loss))
    finite = [x for x in losses if math.isfinite(x)]
    assert _value(registry, "training_step_loss_count") == len(finite)
    assert _value(registry, "training_step_loss_sum") == pytest.approx(sum(finite))
    assert _value(registry, "training_loss_nonfinite_total") == 1
    assert _value(registry, "training_loss_recent_max") == 1e6
    assert _value(registry, "training_step") == 600
    assert _value(registry, "training_loss", split="train") == losses[-1]


def test_huge_losses_keep_the_sums_finite(make, registry):
    """A loss of 1e200 is counted and summed; its square (beyond fp64) is left out of the squared sum."""
    exp = make()
    for loss in (1e200, 2.0, -1e200, 3.0):
        exp.log_step(loss=torch.tensor(loss, dtype=torch.float64))
    assert _value(registry, "training_step_loss_count") == 4
    assert _value(registry, "training_loss_squared_sum_total") == 13.0
    assert _value(registry, "training_loss_positive_sum_total") == pytest.approx(1e200)
    assert _value(registry, "training_loss_nonfinite_total") == 0


def test_model_watched_without_optimizer_warns_once_when_gradients_are_gone(make, registry, caplog):
    exp = make()
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    exp.watch(model)
    with caplog.at_level(logging.WARNING, logger="exporter"):
        for _ in range(3):
            model(torch.ones(2, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()  # before log_step: nothing left to read
            exp.log_step(loss=1.0)
    warnings = [r for r in caplog.records if "before zero_grad()" in r.getMessage()]
    assert len(warnings) == 1
    assert _value(registry, "training_grad_norm") is None or math.isnan(_value(registry, "training_grad_norm"))


# ------------------------------------------------------------------------------------ fused clipping
def _grads(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    model(torch.randn(8, 16, dtype=dtype)).square().sum().backward()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_fused_clip_returns_and_clips_like_torch(dtype, norm_type, foreach):
    ours, theirs = _grads(dtype), _grads(dtype)
    got = exporter.clip_grad_norm_(ours.parameters(), 0.1, norm_type, foreach=foreach)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, norm_type, foreach=foreach)
    assert got.dtype == want.dtype and torch.equal(got, want)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_fused_clip_feeds_the_step_and_reads_no_gradient(make, registry):
    exp = make()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp.watch(model, optimizer)
    stats = exp._steps.watched[0].stats
    reads = []
    compute = stats.compute
    stats.compute = lambda: reads.append(1) or compute()
    norms = []
    for _ in range(5):
        model(torch.randn(8, 16)).square().sum().backward()
        norms.append(exp.clip_grad_norm_(model.parameters(), 0.5))
        optimizer.step()
        optimizer.zero_grad()
        exp.log_step(loss=1.0)
    assert _value(registry, "training_grad_norm") == pytest.approx(float(norms[-1]), rel=1e-6)
    assert _value(registry, "training_grad_norm_sum_total") == pytest.approx(sum(map(float, norms)), rel=1e-6)
    assert reads == []  # detail_every=25: no step of these five needed a second read


def test_fused_clip_with_interval_logging_gives_each_step_its_own_norm(make, registry):
    """log_step every 3 steps: each clipping pass feeds its own optimizer step, not the one still open."""
    exp = make()
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp.watch(model, optimizer)
    norms = []
    for i in range(6):
        model(torch.randn(8, 4) * (i + 1)).square().sum().backward()
        norms.append(float(exp.clip_grad_norm_(model.parameters(), 1e9)))
        optimizer.step()
        optimizer.zero_grad()
        if i % 3 == 2:
            exp.log_step(loss=1.0)
    assert _value(registry, "training_grad_norm_sum_total") == pytest.approx(sum(norms), rel=1e-6)
    assert _value(registry, "training_grad_norm") == pytest.approx(norms[-1], rel=1e-6)


# ------------------------------------------------------------------------------------ torch.compile
def test_compiled_model_publishes_the_eager_norm(make, registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOTAutograd, no C++ toolchain needed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    exp = make()
    exp.watch(compiled, optimizer)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        optimizer.step()
        exp.log_step(loss=loss)
    eager = nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(eager, list(model.parameters()))
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert _value(registry, "training_grad_norm") == pytest.approx(expected, rel=1e-9)
    assert _value(registry, "training_layer_grad_norm", layer="0") > 0
