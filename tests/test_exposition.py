"""The exposition the exporter renders itself: the same bytes as prometheus_client, content negotiation, shared
registries, and the label values of param groups and config."""
import math
import subprocess
import urllib.request

import pytest
import torch
from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry, exposition as client_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from torch import nn

from exporter import TrainingExporter
from exporter.exposition import RenderedFamily, choose_encoder
from exporter.stack.servers import binary

from conftest import value

ACCEPT = [
    "",
    "text/plain; version=0.0.4",
    "text/plain; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text; version=1.0.0; escaping=dots",
    "text/plain; version=1.0.0; escaping=values",
]


class Frozen:
    """One scrape's families, so that two encoders see the same values (process metrics change meanwhile)."""

    def __init__(self, registry):
        self.families = list(registry.collect())

    def collect(self):
        return self.families


@pytest.fixture
def busy(make_exporter):
    """An exporter with every kind of series: two optimizers, layers, evaluations, values that need care in text
    (NaN, infinities, -0.0, large and small numbers) and label values that need escaping."""
    exp = make_exporter(registry=None, config={"lr": 3e-4, "path": 'C:\\runs\n"a"', "name": "réseau ∑",
                                               "scale": torch.tensor(3.0)}, layer_depth=2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1)
    other = nn.Linear(3, 1)
    opt2 = torch.optim.Adam(other.parameters(), lr=1e-3)
    exp.watch(model, opt)
    exp.watch(other, opt2, name="critic")
    for loss in (2.0, float("nan"), 12345678.9, -0.0):
        nn.functional.mse_loss(model(torch.randn(5, 4)), torch.randn(5, 1)).backward()
        other(torch.randn(2, 3)).sum().backward()
        opt.step(), opt2.step()
        exp.log_step(loss=torch.tensor(loss), samples=5)
    exp.log_eval('va"l\\ue\nx', loss=1e-300, metrics={"accuracy": 0.25, "inf": float("inf"), "ninf": -float("inf"),
                                                     "big": 1e22, "int": 7, "tensor": torch.tensor(0.5)})
    exp.log_eval("test", loss=float("nan"), metrics={"f1": 1 / 3})
    exp.log_step(loss=1.0)  # lands the tensor values
    return exp


@pytest.mark.parametrize("accept", ACCEPT)
def test_exposition_is_byte_identical_to_prometheus_client(busy, accept):
    frozen = Frozen(busy.registry)
    assert sum(isinstance(f, RenderedFamily) for f in frozen.families) >= 30
    assert any(not isinstance(f, RenderedFamily) for f in frozen.families)  # the process metrics
    ours, content_type = choose_encoder(accept)
    theirs, their_type = client_exposition.choose_encoder(accept)
    assert content_type == their_type
    assert ours(frozen).decode() == theirs(frozen).decode()


def test_cached_lines_follow_every_change(make_exporter):
    """Lines are reused while their values hold: a value that changes, turns from 0.0 to -0.0 or to NaN and back,
    a new series, are each written as prometheus_client writes them."""
    exp = make_exporter(registry=None)
    ours, _ = choose_encoder("")
    changes = [{"a": 0.0, "b": 1.0}, {"a": -0.0}, {"a": -0.0}, {"a": float("nan")}, {"a": float("nan")},
               {"a": 0.0, "b": 2}, {"c": 1e-7}, {"c": 1e-7, "b": 2.0}]
    for metrics in changes:
        exp.log_eval("val", metrics=metrics)
        for _ in range(2):
            frozen = Frozen(exp.registry)
            assert ours(frozen) == client_exposition.generate_latest(frozen), metrics
    text = ours(Frozen(exp.registry)).decode()
    assert 'training_eval_metric{metric="a",rank="0",run="test-run",split="val"} 0.0\n' in text
    assert 'training_eval_metric{metric="c",rank="0",run="test-run",split="val"} 1e-07\n' in text


odd_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=200)


@settings(max_examples=25, deadline=None)
@given(splits=st.lists(odd_text, min_size=1, max_size=8), names=st.lists(odd_text, min_size=1, max_size=20),
       config=st.dictionaries(odd_text, st.one_of(odd_text, st.floats(), st.integers()), max_size=20),
       values=st.lists(st.floats(), min_size=1, max_size=20), accept=st.sampled_from(ACCEPT))
def test_odd_labels_and_values_are_written_as_prometheus_client_writes_them(splits, names, config, values, accept):
    exp = TrainingExporter(run="odd", port=0, addr="127.0.0.1", registry=CollectorRegistry(), config=config,
                           close_timeout=0)
    try:
        for i, split in enumerate(s for s in splits if s != "train"):
            exp.log_eval(split, loss=values[i % len(values)],
                         metrics={name: values[(i + j) % len(values)] for j, name in enumerate(names)})
        for v in values:
            exp.log_step(loss=v, grad_norm=v)
        ours, _ = choose_encoder(accept)
        theirs, _ = client_exposition.choose_encoder(accept)
        frozen = Frozen(exp.registry)
        assert ours(frozen) == theirs(frozen)
    finally:
        exp.close(stop_server=True)


@pytest.mark.parametrize("openmetrics", [False, True])
def test_parsed_exposition_gives_every_sample(busy, openmetrics):
    frozen = Frozen(busy.registry)
    encoder, _ = choose_encoder("application/openmetrics-text; version=1.0.0" if openmetrics else "")
    parsed = (parse_openmetrics if openmetrics else parse_text)(encoder(frozen).decode())

    def key(sample):
        return sample.name, tuple(sorted(sample.labels.items()))

    def same(a, b):
        return (math.isnan(a) and math.isnan(b)) or a == b

    got = {key(s): s.value for f in parsed for s in f.samples}
    want = {key(s): float(s.value) for f in frozen.families for s in f.samples}
    assert got.keys() == want.keys()
    assert all(same(got[k], want[k]) for k in want), [k for k in want if not same(got[k], want[k])]
    assert got[("training_eval_metric", (("metric", "inf"), ("rank", "0"), ("run", "test-run"),
                                         ("split", 'va"l\\ue\nx')))] == math.inf


def scrape(exp, accept=None):
    request = urllib.request.Request(f"http://127.0.0.1:{exp.port}/metrics", headers={"Accept": accept} if accept
                                     else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read()


def test_promtool_check_metrics_passes_on_the_served_text(busy):
    content_type, body = scrape(busy)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    check = subprocess.run([binary("promtool"), "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == b"" and check.stderr.strip() == b"", check.stdout + check.stderr


def test_openmetrics_is_negotiated(busy):
    content_type, body = scrape(busy, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    assert "# TYPE training_loss_steps counter\n" in text
    assert 'training_loss_steps_total{rank="0",run="test-run"} 3.0\n' in text  # the NaN is not; 1.0 waits for its step
    assert "# TYPE process_cpu_seconds counter\n" in text


def test_exporters_sharing_a_registry_serve_one_family_with_both_runs():
    registry = CollectorRegistry()
    a = TrainingExporter(run="a", port=0, addr="127.0.0.1", registry=registry, close_timeout=0)
    b = TrainingExporter(run="b", port=0, addr="127.0.0.1", registry=registry, close_timeout=0)
    try:
        a.log_step(loss=1.0)
        b.log_step(loss=2.0)
        b.log_step(loss=3.0)
        assert registry.get_sample_value("training_step", {"run": "a", "rank": "0"}) == 1
        assert registry.get_sample_value("training_step", {"run": "b", "rank": "0"}) == 2
        for exp in (a, b):  # each server serves the registry it was given: both runs
            text = scrape(exp)[1].decode()
            for name in ("training_step", "training_loss", "training_phase_start_timestamp_seconds",
                         "training_loss_steps_total"):
                assert text.count(f"# HELP {name} ") == 1 and text.count(f"# TYPE {name} ") == 1, name
            assert 'training_loss{rank="0",run="a",split="train"} 1.0\n' in text
            assert 'training_loss{rank="0",run="b",split="train"} 3.0\n' in text
            check = subprocess.run([binary("promtool"), "check", "metrics"], input=text.encode(), capture_output=True)
            assert check.returncode == 0, check.stdout + check.stderr
    finally:
        a.close(stop_server=True)
        b.close(stop_server=True)


def test_a_run_given_twice_on_one_registry_is_served_once_by_the_newest(caplog):
    registry = CollectorRegistry()
    old = TrainingExporter(run="sweep", port=0, addr="127.0.0.1", registry=registry, close_timeout=0)
    new = TrainingExporter(run="sweep", port=0, addr="127.0.0.1", registry=registry, close_timeout=0)
    try:
        assert "already serves the running run 'sweep' rank 0" in caplog.text
        old.log_step(loss=5.0)
        new.log_step(loss=1.0)
        text = scrape(new)[1].decode()
        assert text.count("\ntraining_loss{") == 1 and 'training_loss{rank="0",run="sweep",split="train"} 1.0\n' in text
        assert text.count("\ntraining_phase_start_timestamp_seconds{") == 1
        assert text.count("\ntraining_step_loss_count{") == 1 and text.count("\ntraining_step_loss_sum{") == 1
        assert registry.get_sample_value("training_step_loss_sum", {"run": "sweep", "rank": "0"}) == 1.0
        check = subprocess.run([binary("promtool"), "check", "metrics"], input=text.encode(), capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        old.close(stop_server=True)
        new.close(stop_server=True)


def test_param_groups_of_two_optimizers_have_consecutive_indices(make_exporter, registry):
    exp = make_exporter()
    first, second = nn.Linear(2, 1), nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [first.weight]}, {"params": [first.bias], "lr": 0.2}], lr=0.1)
    opt2 = torch.optim.SGD(second.parameters(), lr=0.3)
    exp.watch(first, opt)
    exp.watch(second, opt2, name="second")

    def step():
        (first(torch.ones(1, 2)) + second(torch.ones(1, 2))).sum().backward()
        opt2.step()  # the second optimizer steps first: labels follow the order of watch()
        opt.step()
        exp.log_step(loss=1.0)

    step()
    lrs = {s.labels["param_group"]: s.value for f in registry.collect() if f.name == "training_learning_rate"
           for s in f.samples}
    assert lrs == {"0": 0.1, "1": 0.2, "2": 0.3}
    extra = nn.Parameter(torch.zeros(1))
    opt.add_param_group({"params": [extra], "lr": 0.4})
    step()
    assert value(registry, "training_learning_rate", param_group="3") == 0.4
    assert value(registry, "training_learning_rate", param_group="2") == 0.3


def test_tensor_config_values_are_published_as_numbers(make_exporter, registry):
    make_exporter(config={"scale": torch.tensor(3.0), "lr": torch.tensor(0.1), "steps": torch.tensor(7),
                          "betas": torch.tensor([0.9, 0.999], dtype=torch.float64)})
    labels = next(s.labels for f in registry.collect() if f.name == "training_run_info" for s in f.samples)
    assert (labels["config_scale"], labels["config_lr"], labels["config_steps"]) == ("3.0", "0.1", "7")
    assert labels["config_betas"] == "[0.9, 0.999]"
