"""In-process Prometheus exporter for PyTorch training jobs."""
__version__ = "0.1.0"

from .clip import clip_grad_norm_  # noqa: E402
from .core import TrainingExporter  # noqa: E402  (core reads __version__)
from .metrics import METRICS, Metric  # noqa: E402

__all__ = ["TrainingExporter", "clip_grad_norm_", "METRICS", "Metric", "__version__"]
