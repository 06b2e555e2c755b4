import pytest
from prometheus_client import CollectorRegistry

from exporter import TrainingExporter


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
