"""Statistics computed on the device and read back without synchronising the training thread.

Values reach the host through ``AsyncReader``: a ``non_blocking`` copy into pinned host memory followed by a CUDA
event; the host reads the buffer once the event has completed, typically a step later. What must not be lost
between two reads (non-finite steps, the largest loss, sums for means) accumulates on the device in
``StepAccumulator`` until a read of it completes. On the CPU the same code runs synchronously.
"""
from __future__ import annotations

import collections
import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

# Rows of the accumulator; its two columns are the train loss and the global gradient norm.
SUM, COUNT, NONFINITE, MAX, LAST, POS, NEG, SQ = range(8)
LOSS, GRAD = 0, 1


class AsyncReader:
    """Copies device tensors to the host asynchronously and hands the values to callbacks once they arrived."""

    def __init__(self) -> None:
        self._pending: collections.deque = collections.deque()

    def submit(self, tensor: torch.Tensor, callback: Callable[[np.ndarray], None]) -> None:
        """Start copying ``tensor`` to the host; ``callback`` gets its values as a numpy array once complete."""
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            # Already on the host (or a device without events): the copy is synchronous anyway. Queue it behind
            # the device copies so that values keep their order.
            self._pending.append((None, tensor.to("cpu", copy=True), callback))
            return
        # Pinned memory makes the copy truly asynchronous; a non_blocking copy into pageable memory syncs.
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.device(tensor.device):
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append((event, host, callback))

    def poll(self) -> List[Tuple[Callable, np.ndarray]]:
        """Take the copies that have completed, in order, without waiting; returns (callback, values) pairs."""
        ready = []
        while self._pending:
            event, host, callback = self._pending[0]
            if event is not None and not event.query():
                break
            self._pending.popleft()
            ready.append((callback, host.numpy()))
        return ready

    def flush(self) -> List[Tuple[Callable, np.ndarray]]:
        """Wait for every copy in flight (only off the hot path: close, tests) and take them all."""
        for event, _, _ in self._pending:
            if event is not None:
                event.synchronize()
        return self.poll()


class StepAccumulator:
    """Per-device sums, counts, maxima and last values of the train loss and the gradient norm.

    Updated with a constant number of small kernels per step and never read on the training thread; a snapshot
    is copied out by ``AsyncReader`` and the device copy reset, in stream order, so no step is lost or counted twice.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._init = torch.tensor(
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [-np.inf, -np.inf], [np.nan, np.nan], [0.0, 0.0], [0.0, 0.0],
             [0.0, 0.0]],
            dtype=torch.float64, device=device,
        )
        self.acc = self._init.clone()
        # Which columns a step fills, and whether their non-finite values count: host-known, so every mask is
        # built here once instead of copied to the device (a host-to-device copy) during training.
        self._masks: Dict[Tuple[bool, bool, bool], Tuple[torch.Tensor, torch.Tensor]] = {}
        for key in itertools.product((False, True), repeat=3):
            present = torch.tensor(key[:2], dtype=torch.bool, device=device)
            self._masks[key] = (present, present & (not key[2]))
        self._neg_inf = torch.tensor(-np.inf, dtype=torch.float64, device=device)
        self._zero = torch.tensor(0.0, dtype=torch.float64, device=device)
        self._nan = torch.tensor(np.nan, dtype=torch.float64, device=device)
        self.dirty = False
        self.in_flight = False

    def add(self, loss: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor], skipped: bool = False) -> None:
        """Fold one step's loss and/or gradient norm (0-dim tensors on this device) into the accumulator.

        On a step the optimizer skipped (a gradient scaler found infinite gradients), non-finite values are
        expected and neither counted nor published; finite ones are.
        """
        present, counted = self._masks[(loss is not None, grad_norm is not None, skipped)]
        x = torch.stack([
            (loss if loss is not None else self._nan).reshape(()).to(torch.float64),
            (grad_norm if grad_norm is not None else self._nan).reshape(()).to(torch.float64),
        ])
        isfinite = torch.isfinite(x)
        finite = isfinite & present
        bad = counted & ~isfinite
        acc = self.acc
        kept = torch.where(finite, x, self._zero)
        acc[SUM] += kept
        acc[POS] += kept.clamp(min=0)
        acc[NEG] -= kept.clamp(max=0)
        acc[SQ] += kept.square()
        acc[COUNT] += finite
        acc[NONFINITE] += bad
        torch.maximum(acc[MAX], torch.where(finite, x, self._neg_inf), out=acc[MAX])
        acc[LAST] = torch.where(finite | bad, x, acc[LAST])
        self.dirty = True

    def snapshot(self, reader: AsyncReader, callback: Callable[[np.ndarray], None]) -> bool:
        """Copy the accumulated values out and reset; skipped while the previous snapshot is still in flight."""
        if self.in_flight or not self.dirty:
            return False
        self.in_flight = True
        self.dirty = False

        def done(values: np.ndarray) -> None:
            self.in_flight = False
            callback(values)

        reader.submit(self.acc, done)
        self.acc.copy_(self._init)  # ordered after the copy on the same stream
        return True


def _present_grads(params: Sequence[torch.nn.Parameter]) -> Tuple[List[int], List[torch.Tensor]]:
    idx, grads = [], []
    for i, p in enumerate(params):
        g = p.grad
        if g is not None:
            if g.is_sparse:
                g = g.coalesce()._values()
            idx.append(i)
            grads.append(g.detach())
    return idx, grads


class GradStats:
    """Global and per-layer-group gradient L2 norms with a constant number of kernel launches per device.

    ``params`` is a fixed list of parameters; ``groups[i]`` is the layer-group index of ``params[i]`` (or None
    for no per-layer norms).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], groups: Optional[Sequence[int]] = None,
                 n_groups: int = 0) -> None:
        self.params = list(params)
        self.groups = list(groups) if groups is not None else None
        self.n_groups = n_groups
        self._index_cache: Dict[Tuple[torch.device, Tuple[int, ...]], torch.Tensor] = {}

    def compute(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Return (global norm, per-group norms) as device tensors, or (None, None) when no gradient exists."""
        idx, grads = _present_grads(self.params)
        if not grads:
            return None, None
        by_device: Dict[torch.device, Tuple[List[int], List[torch.Tensor]]] = {}
        for i, g in zip(idx, grads):
            entry = by_device.setdefault(g.device, ([], []))
            entry[0].append(i)
            entry[1].append(g)
        home = grads[0].device
        total_sq = None
        group_sq = None
        for device, (d_idx, d_grads) in by_device.items():
            norms = torch._foreach_norm(d_grads, 2)
            sq = torch.stack(norms).to(torch.float64).square()
            part = sq.sum().to(home, non_blocking=True)
            total_sq = part if total_sq is None else total_sq + part
            if self.groups is not None:
                index = self._group_index(device, d_idx)
                gsq = torch.zeros(self.n_groups, dtype=torch.float64, device=device).index_add_(0, index, sq)
                gsq = gsq.to(home, non_blocking=True)
                group_sq = gsq if group_sq is None else group_sq + gsq
        return total_sq.sqrt(), (group_sq.sqrt() if group_sq is not None else None)

    def mean(self) -> Optional[torch.Tensor]:
        """Mean over parameters of each gradient's mean (the seed's ``grad_mean``): one small kernel per tensor,
        so it runs on an interval, not every step."""
        _, grads = _present_grads(self.params)
        if not grads:
            return None
        home = grads[0].device
        return torch.stack([g.mean(dtype=torch.float32).to(home, non_blocking=True) for g in grads]).mean()

    def _group_index(self, device: torch.device, present: List[int]) -> torch.Tensor:
        key = (device, tuple(present))
        index = self._index_cache.get(key)
        if index is None:
            index = torch.tensor([self.groups[i] for i in present], dtype=torch.long, device=device)
            self._index_cache[key] = index
        return index
