"""Gradient clipping that feeds the exporter: the clipping pass reads every gradient once, and its L2 norm is
the step's published norm, so the exporter's hooks do not read the gradients a second time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Union

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

if TYPE_CHECKING:
    from .core import TrainingExporter


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    exporter: Optional["TrainingExporter"] = None) -> torch.Tensor:
    """A drop-in for ``torch.nn.utils.clip_grad_norm_``: same arguments, same result, computed by torch's own
    ``get_total_norm`` and ``clip_grads_with_norm_``.

    With ``exporter`` and ``norm_type=2``, the returned total norm (before clipping) becomes the global gradient
    norm of the optimizer step that follows, as if passed to ``log_step(grad_norm=...)``, and the exporter reads no
    gradient for that step (per-layer norms, when sampled on that step, still read them). Other norm types are
    not the L2 norm the exporter publishes: its hooks read the gradients as without clipping.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    clip_grads_with_norm_(parameters, max_norm, total, foreach)
    if exporter is not None and float(norm_type) == 2.0 and grads:
        exporter._clipped(total)
    return total
