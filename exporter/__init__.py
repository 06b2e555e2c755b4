"""In-process Prometheus exporter for PyTorch training jobs."""
__version__ = "0.1.0"

from .core import TrainingExporter  # noqa: E402  (core reads __version__)
from .metrics import METRICS, Metric  # noqa: E402

__all__ = ["TrainingExporter", "METRICS", "Metric", "__version__"]
