"""The docs name only metrics that exist, and every metric is documented."""
import re
from pathlib import Path

from exporter.metrics import METRICS, sample_names

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_metric():
    readme = (ROOT / "README.md").read_text()
    for name, metric in METRICS.items():
        assert f"| `{name}` | {metric.type} |" in readme, name


def test_readme_names_no_unknown_metric():
    readme = (ROOT / "README.md").read_text()
    known = set(METRICS) | sample_names()
    for name in set(re.findall(r"`(training_[a-z_]+)`", readme)):
        assert name in known, name
