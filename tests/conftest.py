import time

import pytest
from prometheus_client import CollectorRegistry

from exporter import TrainingExporter
from exporter.stack.showcase import EXPECTED, Showcase

QUIET = ("healthy", "noisy", "cosine", "stepdecay")


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def make_exporter(registry):
    """Exporters on a free loopback port with a fresh registry; their servers stop after the test."""
    made = []

    def make(run="test-run", **kwargs):
        kwargs.setdefault("registry", registry)
        kwargs.setdefault("port", 0)
        kwargs.setdefault("addr", "127.0.0.1")
        exp = TrainingExporter(run=run, **kwargs)
        made.append(exp)
        return exp

    yield make
    for exp in made:
        if not exp._closed:
            exp.close()
        exp.close(stop_server=True)


def value(registry, name, **labels):
    """A sample of the default test run (rank 0), or None when absent."""
    labels.setdefault("run", "test-run")
    labels.setdefault("rank", "0")
    return registry.get_sample_value(name, labels)


@pytest.fixture(scope="session")
def showcase(tmp_path_factory):
    """What `make demo` runs, once for the session: a training run per pathology and the quiet ones, a real
    Prometheus and Alertmanager with the demo-speed rules, every expected alert arrived (or 7 minutes passed)."""
    show = Showcase(workdir=tmp_path_factory.mktemp("showcase"),
                    scenarios=[s for s in EXPECTED if s != "healthy"] + list(QUIET), finishing=("healthy",))
    try:
        show.start()
        show.watch(420)
        time.sleep(5)  # a late alert on a quiet run would show now
        show.poll()
        yield show
    finally:
        show.stop()
        print("\n" + show.summary())
