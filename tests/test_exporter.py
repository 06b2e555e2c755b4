import logging
import math
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from exporter import METRICS, TrainingExporter
from exporter.core import _layer_groups
from exporter.metrics import DROP_KINDS, ERROR_SITES

from conftest import value


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def train_steps(exp, model, optimizer, n, loss_hook=None):
    """n real SGD steps on random data; returns the loss tensors."""
    losses = []
    for i in range(n):
        x, y = torch.randn(4, 8), torch.randn(4, 2)
        loss = nn.functional.mse_loss(model(x), y)
        if loss_hook is not None:
            loss = loss_hook(i, loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        exp.log_step(loss=loss, samples=4)
        losses.append(loss.detach())
    return losses


def test_every_defined_family_is_served(make_exporter, registry):
    make_exporter()
    served = {m.name for m in registry.collect()}
    for name in METRICS:
        family = name[:-len("_total")] if METRICS[name].type == "counter" else name
        assert family in served, name


def test_event_counters_exist_at_zero_before_any_event(make_exporter, registry):
    make_exporter()
    for name in ("training_loss_nonfinite_total", "training_grad_nonfinite_total",
                 "training_scaler_skipped_steps_total", "training_samples_total"):
        assert value(registry, name) == 0.0, name
    for where in ERROR_SITES:
        assert value(registry, "training_exporter_errors_total", where=where) == 0.0
    for kind in DROP_KINDS:
        assert value(registry, "training_exporter_dropped_total", kind=kind) == 0.0
    assert value(registry, "training_step_loss_count") == 0.0
    assert value(registry, "training_step") == 0.0
    assert value(registry, "training_run_status", status="running") == 1.0
    # A gauge with no value yet is absent rather than a made-up number.
    assert value(registry, "training_loss", split="train") is None
    assert value(registry, "training_last_step_timestamp_seconds") is None


def test_log_step_with_numbers_and_tensors(make_exporter, registry):
    exp = make_exporter()
    exp.log_step(loss=2.5, samples=32)
    exp.log_step(loss=torch.tensor(1.5), samples=32, lr=0.1)
    assert value(registry, "training_step") == 2
    assert value(registry, "training_loss", split="train") == 1.5
    assert value(registry, "training_samples_total") == 64
    assert value(registry, "training_step_loss_sum") == 4.0
    assert value(registry, "training_step_loss_count") == 2
    assert value(registry, "training_learning_rate", param_group="0") == 0.1
    assert value(registry, "training_step_duration_seconds_count") == 1
    assert value(registry, "training_last_step_timestamp_seconds") == pytest.approx(exp.state.last_step_time)


def test_step_override_for_resumed_jobs(make_exporter, registry):
    exp = make_exporter()
    exp.log_step(loss=1.0, step=5000)
    exp.log_step(loss=1.0)
    assert value(registry, "training_step") == 5001


def test_nan_and_inf_losses_are_counted_not_rejected(make_exporter, registry):
    exp = make_exporter()
    exp.log_step(loss=1.0)
    exp.log_step(loss=float("nan"))
    exp.log_step(loss=torch.tensor(float("inf")))
    exp.log_step(loss=2.0)
    assert value(registry, "training_loss_nonfinite_total") == 2
    assert value(registry, "training_step_loss_sum") == 3.0  # non-finite losses do not poison the mean
    assert value(registry, "training_step_loss_count") == 2
    assert value(registry, "training_loss", split="train") == 2.0


def test_one_step_spike_between_scrapes_is_kept(make_exporter, registry):
    exp = make_exporter(max_window=3600)
    for i in range(50):
        exp.log_step(loss=torch.tensor(100.0 if i == 20 else 1.0))
    # The gauge shows the latest value; the spike survives in the recent maximum and in the sum.
    assert value(registry, "training_loss", split="train") == 1.0
    assert value(registry, "training_loss_recent_max") == 100.0
    assert value(registry, "training_step_loss_sum") == 149.0


def test_recent_max_forgets_old_steps(make_exporter, registry):
    exp = make_exporter(max_window=60)
    exp.log_step(loss=100.0)
    exp.state._recent[0] = (exp.state._recent[0][0] - 120, *exp.state._recent[0][1:])  # age the spike
    exp.log_step(loss=1.0)
    assert value(registry, "training_loss_recent_max") == 1.0


def test_eval_loss_and_metrics(make_exporter, registry):
    exp = make_exporter()
    exp.log_step(loss=1.0)
    exp.log_eval("val", loss=torch.tensor(0.75), metrics={"accuracy": 0.9, "f1": torch.tensor(0.8)})
    exp.log_eval("test", loss=0.8, metrics={"accuracy": 0.85}, step=7)
    assert value(registry, "training_loss", split="val") == 0.75
    assert value(registry, "training_loss", split="test") == 0.8
    assert value(registry, "training_eval_metric", split="val", metric="accuracy") == 0.9
    assert value(registry, "training_eval_metric", split="val", metric="f1") == pytest.approx(0.8)
    assert value(registry, "training_eval_step", split="val") == 1
    assert value(registry, "training_eval_step", split="test") == 7


def test_eval_metric_series_are_bounded(make_exporter, registry):
    exp = make_exporter(max_eval_series=3)
    exp.log_eval("val", metrics={f"m{i}": i for i in range(5)})
    exp.log_eval("val", metrics={"m0": 10})
    assert value(registry, "training_eval_metric", split="val", metric="m0") == 10
    assert value(registry, "training_eval_metric", split="val", metric="m3") is None
    assert value(registry, "training_exporter_dropped_total", kind="eval") == 2


def test_epoch(make_exporter, registry):
    exp = make_exporter()
    exp.set_epoch(3)
    assert value(registry, "training_epoch") == 3


@pytest.mark.parametrize("call, message", [
    (lambda e: e.log_step(loss="0.5"), "loss must be a number"),
    (lambda e: e.log_step(loss=torch.ones(3)), r"loss must be a number or a one-element tensor, got a tensor"),
    (lambda e: e.log_step(loss=1.0, grad_norm=[1.0]), "grad_norm must be a number"),
    (lambda e: e.log_step(loss=1.0, samples=2.5), "samples must be an int"),
    (lambda e: e.log_step(loss=1.0, step="3"), "step must be an int"),
    (lambda e: e.log_step(loss=1.0, lr="high"), "lr must be a number"),
    (lambda e: e.log_eval(3, loss=1.0), "split must be a string"),
    (lambda e: e.log_eval("val", metrics={"accuracy": "high"}), "metric 'accuracy' must be a number"),
    (lambda e: e.log_eval("val", metrics=[0.9]), "metrics must be a mapping"),
    (lambda e: e.set_epoch("1"), "epoch must be an int"),
])
def test_misuse_raises_type_error_naming_the_argument(make_exporter, call, message):
    with pytest.raises(TypeError, match=message):
        call(make_exporter())


@pytest.mark.parametrize("call, message", [
    (lambda e: e.log_step(loss=1.0, samples=-1), "samples must be >= 0"),
    (lambda e: e.log_eval("", loss=1.0), "non-empty"),
    (lambda e: e.log_eval("train", loss=1.0), "reserved"),
    (lambda e: e.close("exploded"), "status must be one of"),
])
def test_bad_values_raise_value_error(make_exporter, call, message):
    with pytest.raises(ValueError, match=message):
        call(make_exporter())


def test_config_becomes_bounded_sanitised_info_labels(make_exporter, registry):
    config = {"lr": 3e-4, "batch-size": 32, "model": {"name": "resnet50", "depth": 50}, "note": "x" * 500}
    make_exporter(config=config, max_config_labels=4)
    info = [s for m in registry.collect() if m.name == "training_run_info" for s in m.samples][0]
    assert info.value == 1
    assert info.labels["config_lr"] == "0.0003"
    assert info.labels["config_batch_size"] == "32"
    assert info.labels["config_model_name"] == "resnet50"
    assert info.labels["config_model_depth"] == "50"
    assert "config_note" not in info.labels
    assert info.labels["world_size"] == "1"
    assert value(registry, "training_exporter_dropped_total", kind="config") == 1


def test_grad_statistics_match_float64_reference(make_exporter, registry):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = make_exporter(detail_every=1)
    exp.watch(model, optimizer)
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    optimizer.step()
    exp.log_step(loss=loss)

    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert value(registry, "training_grad_norm") == pytest.approx(total, rel=1e-6)
    for layer in ("0", "2", "4"):
        expected = math.sqrt(sum(float((g ** 2).sum()) for n, g in grads.items() if n.startswith(layer + ".")))
        assert value(registry, "training_layer_grad_norm", layer=layer) == pytest.approx(expected, rel=1e-6)
    mean = sum(float(g.mean()) for g in grads.values()) / len(grads)
    assert value(registry, "training_grad_mean") == pytest.approx(mean, rel=1e-5)
    assert value(registry, "training_learning_rate", param_group="0") == 0.01


def test_learning_rate_of_every_param_group_follows_the_scheduler(make_exporter, registry):
    model = small_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                                 {"params": model[2].parameters()}, {"params": model[4].parameters()}], lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    exp = make_exporter()
    exp.watch(model, optimizer)
    train_steps(exp, model, optimizer, 1)
    scheduler.step()
    train_steps(exp, model, optimizer, 1)
    assert value(registry, "training_learning_rate", param_group="0") == 0.05
    assert value(registry, "training_learning_rate", param_group="1") == 0.005
    assert value(registry, "training_learning_rate", param_group="2") == 0.005


def test_user_grad_norm_from_clipping_wins(make_exporter, registry):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = make_exporter()
    exp.watch(model, optimizer)
    loss = nn.functional.mse_loss(model(torch.randn(4, 8)) * 100, torch.randn(4, 2))
    loss.backward()
    pre_clip = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
    optimizer.step()
    exp.log_step(loss=loss, grad_norm=pre_clip)
    assert value(registry, "training_grad_norm") == pytest.approx(float(pre_clip))
    assert value(registry, "training_grad_norm") > 0.1


def test_watch_without_optimizer_reads_gradients_at_log_step(make_exporter, registry):
    model = small_model()
    exp = make_exporter()
    exp.watch(model)
    loss = nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 2))
    loss.backward()
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    exp.log_step(loss=loss)
    assert value(registry, "training_grad_norm") == pytest.approx(expected, rel=1e-6)
    assert value(registry, "training_scaler_skipped_steps_total") == 0


def test_layer_groups_are_bounded():
    names = ["embed.weight", "layers.0.attn.weight", "layers.0.mlp.weight", "layers.1.attn.weight",
             "head.weight", "head.bias", "norm.weight", "scale"]
    groups, labels, merged = _layer_groups(names, depth=1, limit=2)
    assert labels == ["embed", "layers", "other"]
    assert groups == [0, 1, 1, 1, 2, 2, 2, 2]
    assert merged == 3  # head, norm and (root) share "other"
    groups, labels, _ = _layer_groups(names, depth=2, limit=16)
    assert labels == ["embed", "layers.0", "layers.1", "head", "norm", "(root)"]


def test_per_layer_cap_counts_merged_groups(make_exporter, registry):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    exp = make_exporter(max_layers=2)
    exp.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert value(registry, "training_exporter_dropped_total", kind="layer") == 3
    layer_series = [s for m in registry.collect() if m.name == "training_layer_grad_norm" for s in m.samples]
    assert layer_series == []  # no step yet
    optimizer = exp._watched[0][0]
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    exp.log_step(loss=1.0)
    layers = {s.labels["layer"] for m in registry.collect() if m.name == "training_layer_grad_norm" for s in m.samples}
    assert layers == {"0", "1", "other"}


def test_watching_an_optimizer_twice_is_refused(make_exporter):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = make_exporter()
    exp.watch(model, optimizer)
    with pytest.raises(ValueError, match="already watched"):
        exp.watch(model, optimizer)


def test_nonfinite_gradients_without_scaler_are_counted(make_exporter, registry):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = make_exporter()
    exp.watch(model, optimizer)
    loss = nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 2))
    loss.backward()
    model[0].weight.grad[0, 0] = float("inf")
    optimizer.step()
    exp.log_step(loss=loss)
    assert value(registry, "training_grad_nonfinite_total") == 1
    assert value(registry, "training_loss_nonfinite_total") == 0
    assert value(registry, "training_scaler_skipped_steps_total") == 0


def test_scaler_skipped_step_is_not_a_nonfinite_loss(make_exporter, registry):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    exp = make_exporter()
    exp.watch(model, optimizer)
    for i in range(4):
        loss = nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 2))
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if i == 2:  # an fp16 overflow, as a scaler meets it now and then
            model[2].weight.grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)
        pre_clip = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(optimizer)
        scaler.update()
        exp.log_step(loss=loss, grad_norm=pre_clip)
    assert scaler.get_scale() == 2.0 ** 7  # the scaler did skip one step
    assert value(registry, "training_scaler_skipped_steps_total") == 1
    assert value(registry, "training_loss_nonfinite_total") == 0
    assert value(registry, "training_grad_nonfinite_total") == 0
    assert math.isfinite(value(registry, "training_grad_norm"))
    assert value(registry, "training_step") == 4


class _TensorSyncs:
    """Makes every host read of a tensor raise while active: what would synchronise with a GPU."""

    names = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def trap(name):
            def sync(*args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name}() in the training thread")
            return sync

        for n in self.names:
            setattr(torch.Tensor, n, trap(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_training_thread_never_reads_a_tensor(make_exporter, registry):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = make_exporter(detail_every=1)
    exp.watch(model, optimizer)
    losses = []
    for _ in range(3):
        x, y = torch.randn(4, 8), torch.randn(4, 2)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        with _TensorSyncs():
            optimizer.step()  # runs the exporter's hooks
            exp.log_step(loss=loss, samples=4, grad_norm=None)
            exp.log_eval("val", loss=loss.detach(), metrics={"mse": loss.detach()})
        losses.append(float(loss.detach()))
    assert sum(value(registry, "training_exporter_errors_total", where=w) for w in ERROR_SITES) == 0
    assert value(registry, "training_step_loss_sum") == pytest.approx(sum(losses))


def test_fault_in_hook_is_counted_and_logged_once(make_exporter, registry, monkeypatch, caplog):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = make_exporter()
    exp.watch(model, optimizer)

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr("exporter.device_stats.GradStats.compute", broken)
    with caplog.at_level(logging.ERROR, logger="exporter"):
        train_steps(exp, model, optimizer, 3)  # training goes on
    assert value(registry, "training_exporter_errors_total", where="hook") == 3
    assert len([r for r in caplog.records if "fault in hook" in r.getMessage()]) == 1
    assert value(registry, "training_step") == 3
    assert value(registry, "training_learning_rate", param_group="0") == 0.01


def test_taken_port_names_port_and_how_to_choose_another(registry):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=rf"127.0.0.1:{port}.*already in use.*port=.*TRAINING_EXPORTER_PORT"):
            TrainingExporter(run="r", port=port, addr="127.0.0.1", registry=registry)


def test_two_exporters_in_one_process_do_not_clash():
    a = TrainingExporter(run="a", port=0, addr="127.0.0.1")
    b = TrainingExporter(run="b", port=0, addr="127.0.0.1")
    try:
        a.log_step(loss=1.0)
        assert a.registry.get_sample_value("training_step", {"run": "a", "rank": "0"}) == 1
        assert b.registry.get_sample_value("training_step", {"run": "b", "rank": "0"}) == 0
        # Their own registries include the training process's metrics.
        assert a.registry.get_sample_value("process_resident_memory_bytes") > 0
    finally:
        a.close(stop_server=True)
        b.close(stop_server=True)


def test_close_publishes_end_and_keeps_serving(make_exporter, registry):
    exp = make_exporter()
    exp.log_step(loss=torch.tensor(1.0))
    exp.close("failed")
    assert value(registry, "training_run_status", status="failed") == 1
    assert value(registry, "training_run_status", status="running") == 0
    body = urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=5).read().decode()
    assert 'training_run_status{rank="0",run="test-run",status="failed"} 1.0' in body
    with pytest.raises(RuntimeError, match="after close"):
        exp.log_step(loss=1.0)


@pytest.mark.parametrize("error, status", [(None, "completed"), (ValueError, "failed"),
                                           (KeyboardInterrupt, "interrupted")])
def test_context_manager_status(registry, error, status):
    try:
        with TrainingExporter(run="test-run", port=0, addr="127.0.0.1", registry=registry) as exp:
            if error:
                raise error()
    except (ValueError, KeyboardInterrupt):
        pass
    finally:
        exp.close(stop_server=True)
    assert value(registry, "training_run_status", status=status) == 1


def test_ranks_serve_their_own_ports_with_one_run_id(tmp_path):
    """Two processes as torchrun starts them: same run id, rank label, port offset by local rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    code = ("import os, sys, urllib.request; from exporter import TrainingExporter; "
            "e = TrainingExporter(addr='127.0.0.1'); "
            "print(e.run, e.rank, e.port, flush=True); sys.stdin.read()")
    procs = []
    try:
        for rank in (0, 1):
            env = {"PATH": "/usr/bin:/bin", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "TORCHELASTIC_RUN_ID": "job-17", "TRAINING_EXPORTER_PORT": str(base)}
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True))
        lines = [p.stdout.readline().split() for p in procs]
        assert lines == [["job-17", "0", str(base)], ["job-17", "1", str(base + 1)]]
        body = urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=5).read().decode()
        assert 'training_step{rank="1",run="job-17"} 0.0' in body
        assert 'world_size="2"' in body
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)


def test_shared_registry_is_used_as_given():
    registry = CollectorRegistry()
    exp = TrainingExporter(run="shared", port=0, addr="127.0.0.1", registry=registry)
    try:
        assert exp.registry is registry
        assert registry.get_sample_value("training_step", {"run": "shared", "rank": "0"}) == 0
        assert registry.get_sample_value("process_resident_memory_bytes") is None
    finally:
        exp.close(stop_server=True)


def test_loss_counters_give_exact_means_also_for_negative_losses(make_exporter, registry):
    exp = make_exporter()
    losses = [2.0, -1.5, float("nan"), 0.5, -3.0]
    for loss in losses:
        exp.log_step(loss=torch.tensor(loss))
    finite = [x for x in losses if math.isfinite(x)]
    assert value(registry, "training_loss_steps_total") == len(finite)
    pos, neg = value(registry, "training_loss_positive_sum_total"), value(registry, "training_loss_negative_sum_total")
    assert (pos, neg) == (2.5, 4.5)
    assert (pos - neg) / len(finite) == pytest.approx(sum(finite) / len(finite))
    assert value(registry, "training_loss_squared_sum_total") == pytest.approx(sum(x * x for x in finite))


def test_grad_norm_counters_and_last_nonfinite_time(make_exporter, registry):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = make_exporter()
    exp.watch(model, optimizer)
    norms = []
    before = None
    for i in range(4):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 2)).backward()
        norms.append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())))
        optimizer.step()
        if i == 2:
            assert value(registry, "training_last_nonfinite_timestamp_seconds") is None
            before = time.time()
        exp.log_step(loss=float("nan") if i == 2 else 1.0)  # the NaN's time outlives the step after it
    assert value(registry, "training_grad_norm_steps_total") == 4
    assert value(registry, "training_grad_norm_sum_total") == pytest.approx(sum(norms), rel=1e-6)
    assert before <= value(registry, "training_last_nonfinite_timestamp_seconds") <= time.time()


def test_eval_best_and_evaluations_since_best(make_exporter, registry):
    exp = make_exporter()
    for loss in (1.0, 0.8, torch.tensor(0.9), 0.85):
        exp.log_eval("val", loss=loss)
    exp.log_eval("val", metrics={"accuracy": 0.5})
    assert value(registry, "training_evals_total", split="val") == 5
    assert value(registry, "training_eval_loss_best", split="val") == 0.8
    assert value(registry, "training_evals_since_best", split="val") == 2
    exp.log_eval("val", loss=0.7)
    assert value(registry, "training_evals_since_best", split="val") == 0
    assert value(registry, "training_eval_loss_best", split="val") == 0.7
