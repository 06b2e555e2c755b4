"""Property-based tests of the Python API: wrong types are refused naming the argument; data values never raise
and are published or counted; the exposition stays valid whatever the strings."""
import math
import shutil
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter import TrainingExporter, labels

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

not_int = st.one_of(st.text(max_size=5), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2),
                    st.integers(max_value=-1))
not_number = st.one_of(st.text(max_size=5), st.lists(st.text(max_size=2), min_size=1, max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.booleans(),
                       st.builds(lambda n: torch.zeros(n), st.integers(2, 4)))
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-10**30, max_value=10**30),
    st.builds(lambda v, dtype: torch.tensor(v).to(dtype), st.floats(allow_nan=True, allow_infinity=True, width=32),
              st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])),
)
odd_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=300)


@pytest.fixture(scope="module")
def exp():
    exporter = TrainingExporter(run="props", port=0, addr="127.0.0.1", registry=CollectorRegistry(), close_timeout=0)
    yield exporter
    exporter.close(stop_server=True)


@SETTINGS
@given(arg=st.sampled_from(["detail_every", "max_layers", "max_eval_series", "max_config_labels", "layer_depth"]),
       bad=not_int)
def test_constructor_refuses_bad_counts_naming_them(arg, bad):
    with pytest.raises((TypeError, ValueError), match=arg):
        TrainingExporter(run="x", port=0, addr="127.0.0.1", registry=CollectorRegistry(), **{arg: bad})


@SETTINGS
@given(arg=st.sampled_from(["max_window", "close_timeout"]),
       bad=st.one_of(st.text(max_size=3), st.booleans(), st.floats(max_value=-1e-9), st.just(math.nan),
                     st.lists(st.floats(), max_size=2)))
def test_constructor_refuses_bad_durations_naming_them(arg, bad):
    with pytest.raises((TypeError, ValueError), match=arg):
        TrainingExporter(run="x", port=0, addr="127.0.0.1", registry=CollectorRegistry(), **{arg: bad})
    # Waiting forever at exit for a scrape is never meant; keeping every step's maximum (max_window=inf) may be.
    with pytest.raises(ValueError, match="close_timeout"):
        TrainingExporter(run="x", port=0, addr="127.0.0.1", registry=CollectorRegistry(), close_timeout=math.inf)


@SETTINGS
@given(arg=st.sampled_from(["port", "run", "config", "config_allow", "config_deny", "web_config"]),
       bad=st.one_of(st.integers(max_value=-1), st.integers(min_value=65536), st.floats(), st.booleans(),
                     st.lists(st.integers(), min_size=1, max_size=2)))
def test_constructor_refuses_other_bad_arguments_naming_them(arg, bad):
    with pytest.raises((TypeError, ValueError), match=arg):
        TrainingExporter(run="x", port=0, addr="127.0.0.1", registry=CollectorRegistry(), **{arg: bad})


@SETTINGS
@given(arg=st.sampled_from(["loss", "grad_norm", "samples", "step", "lr"]), bad=not_number)
def test_log_step_refuses_wrong_types_naming_the_argument(exp, arg, bad):
    with pytest.raises((TypeError, ValueError), match=arg):
        exp.log_step(**{arg: bad})


@SETTINGS
@given(split=st.one_of(st.integers(), st.none(), st.just(""), st.just("train")),
       metrics=st.one_of(st.lists(st.floats(), max_size=2), st.dictionaries(st.integers(), st.floats(), min_size=1)),
       epoch=st.one_of(st.integers(max_value=-1), st.text(max_size=3), st.floats(), st.booleans()))
def test_log_eval_refuses_wrong_types_naming_the_argument(exp, split, metrics, epoch):
    with pytest.raises((TypeError, ValueError), match="split"):
        exp.log_eval(split, loss=1.0)
    with pytest.raises((TypeError, ValueError), match="metric"):
        exp.log_eval("val", metrics=metrics)
    with pytest.raises((TypeError, ValueError), match="epoch"):
        exp.set_epoch(epoch)


def _count(registry, name, **labels_):
    return registry.get_sample_value(name, {"run": "values", "rank": "0", **labels_}) or 0.0


@settings(max_examples=30, deadline=None)
@given(values=st.lists(numbers, min_size=1, max_size=20))
@example(values=[-1.450407090543524e+297, -1.7976931348478117e+308])  # a sum that overflows float64
def test_data_values_never_raise_and_are_published_or_counted(values):
    registry = CollectorRegistry()
    exp = TrainingExporter(run="values", port=0, addr="127.0.0.1", registry=registry, close_timeout=0)
    try:
        for v in values:
            exp.log_step(loss=v, grad_norm=v, samples=1)
        exp.log_eval("val", loss=values[-1], metrics={"m": values[0]})
        exp.close()  # flushes every pending device read
        as_float = [float(v.double()) if isinstance(v, torch.Tensor) else float(v) for v in values]
        finite = [f for f in as_float if math.isfinite(f)]
        assert _count(registry, "training_exporter_errors_total", where="log") == 0
        assert _count(registry, "training_step") == len(values)
        assert _count(registry, "training_samples_total") == len(values)
        assert _count(registry, "training_step_loss_count") == len(finite)
        assert _count(registry, "training_loss_nonfinite_total") == len(values) - len(finite)
        # Past 1e300 the float64 sum may overflow (and fsum, the reference, raises): only smaller values compare.
        assert not all(abs(f) < 1e300 for f in finite) \
            or _count(registry, "training_step_loss_sum") == pytest.approx(math.fsum(finite), rel=1e-6, abs=1e-6)
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            assert family.samples is not None
    finally:
        exp.close(stop_server=True)


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install prometheus")
    return path


@settings(max_examples=15, deadline=None)
@given(splits=st.lists(odd_text, min_size=1, max_size=20), names=st.lists(odd_text, min_size=1, max_size=40),
       config=st.dictionaries(odd_text, st.one_of(odd_text, st.floats(), st.integers()), max_size=40))
def test_odd_strings_give_a_valid_bounded_exposition(promtool, splits, names, config):
    registry = CollectorRegistry()
    exp = TrainingExporter(run="odd", port=0, addr="127.0.0.1", registry=registry, config=config, close_timeout=0)
    try:
        for split in splits:
            if split == "train":
                continue
            exp.log_eval(split, loss=0.5, metrics={name: 1.0 for name in names})
        text = generate_latest(registry)
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                assert all(len(v) <= labels.MAX_VALUE for v in sample.labels.values())
                assert all(len(k) <= labels.MAX_VALUE for k in sample.labels)
        dropped = sum(registry.get_sample_value("training_exporter_dropped_total",
                                                {"run": "odd", "rank": "0", "kind": k}) for k in ("eval", "config"))
        cut = sum(len(s) > labels.MAX_VALUE for s in set(splits) | set(names)) + sum(
            len(str(k)) + 7 > labels.MAX_VALUE or len(str(v)) > labels.MAX_VALUE for k, v in config.items())
        assert dropped >= min(cut, 1)
    finally:
        exp.close(stop_server=True)
