"""Statistics computed on the device and read back without synchronising the training thread.

Values reach the host through ``AsyncReader``: a ``non_blocking`` copy into pinned host memory followed by a CUDA
event; the host reads the buffer once the event has completed, typically a step later. What must not be lost
between two reads (non-finite steps, the largest loss, sums for means) accumulates on the device in
``StepAccumulator`` until a read of it completes. On the CPU the same code runs synchronously.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

# Rows of the accumulator; its two columns are the train loss and the global gradient norm. The first rows add up.
SUM, COUNT, POS, NEG, SQ, NONFINITE, SKIPPED, MAX, LAST = range(9)
_ADDED = SKIPPED + 1
LOSS, GRAD = 0, 1


class AsyncReader:
    """Copies device tensors to the host asynchronously and hands the values to callbacks once they arrived."""

    def __init__(self) -> None:
        self._pending: collections.deque = collections.deque()

    def submit(self, tensor: torch.Tensor, callback: Callable[[np.ndarray], None]) -> None:
        """Start copying ``tensor`` to the host; ``callback`` gets its values as a numpy array once complete."""
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
            tensor = tensor.float()
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

    def pending_events(self) -> List[torch.cuda.Event]:
        """The events of the copies in flight, for a thread that may wait on them (never the training thread)."""
        return [event for event, _, _ in self._pending if event is not None]

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
    Finite micro-batch losses wait on the device until their optimizer step closes.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._init = torch.zeros(SKIPPED + 3, 2, dtype=torch.float64, device=device)
        self._init[MAX] = -np.inf  # fills on the device, not copies from the host
        self._init[LAST] = np.nan
        self.acc = self._init.clone()
        self._zero = torch.zeros((), dtype=torch.float64, device=device)
        self._neg_inf = torch.full((), -np.inf, dtype=torch.float64, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self._nan = torch.full((), np.nan, dtype=torch.float64, device=device)
        self._pending = torch.zeros(2, dtype=torch.float64, device=device)  # finite micro-batch losses: sum, count
        self.pending = False
        self.dirty = False
        self.in_flight = False
        self._stream = None  # the CUDA stream the training thread updates on; a scrape snapshots on it too

    def fold_loss(self, loss: torch.Tensor) -> None:
        """Add one loss (0-dim, this device) to the open optimizer step. A non-finite one is counted at once, so
        that a loop that skips its update for it, or a step that never comes, still shows it."""
        x = loss.reshape(()).to(torch.float64)
        finite = torch.isfinite(x)
        self._pending += torch.stack([torch.where(finite, x, self._zero), finite.to(torch.float64)])
        column = self.acc[:, LOSS]
        column[NONFINITE] += (~finite).to(torch.float64)
        column[LAST] = torch.where(finite, column[LAST], x)
        self._touched()
        self.pending = True

    def close_loss(self, weight: int) -> None:
        """Close the open step's loss, the mean of its finite losses, standing for ``weight`` optimizer steps
        (interval logging: one loss for several steps; 0 drops it)."""
        if not self.pending:
            return
        total, n = self._pending[0], self._pending[1]
        self._fold(LOSS, torch.where(n > 0, total / n, self._nan), weight, n == 0)
        self._pending.zero_()
        self.pending = False

    def add_grad(self, norm: torch.Tensor, skipped: Union[bool, torch.Tensor, None] = None) -> None:
        """Fold one optimizer step's global gradient norm. ``skipped`` marks a step a gradient scaler skipped:
        its non-finite norm is expected, not counted as non-finite. A device bool is the scaler's own verdict and
        is also counted as a skip; ``True`` is a skip the host already knows and counts."""
        expected = self._true if skipped is True else (skipped if isinstance(skipped, torch.Tensor) else None)
        self._fold(GRAD, norm.reshape(()).to(torch.float64), 1, expected,
                   skipped if isinstance(skipped, torch.Tensor) else None)

    def _fold(self, col: int, x: torch.Tensor, weight: int, expected: Optional[torch.Tensor],
              skip: Optional[torch.Tensor] = None) -> None:
        finite = torch.isfinite(x)
        bad = ~finite if expected is None else ~finite & ~expected
        kept = torch.where(finite, x, self._zero)
        w = float(weight)
        added = torch.stack([
            kept * w, finite.to(torch.float64) * w, kept.clamp(min=0) * w, (-kept).clamp(min=0) * w,
            kept.square() * w, bad.to(torch.float64), self._zero if skip is None else skip.to(torch.float64),
        ])
        column = self.acc[:, col]
        column[:_ADDED] += added
        torch.maximum(column[MAX], torch.where(finite, x, self._neg_inf), out=column[MAX])
        column[LAST] = torch.where(finite | bad, x, column[LAST])
        self._touched()

    def _touched(self) -> None:
        self.dirty = True
        if self.device.type == "cuda":
            self._stream = torch.cuda.current_stream(self.device)

    def snapshot(self, reader: AsyncReader, callback: Callable[[np.ndarray], None]) -> bool:
        """Copy the accumulated values out and reset; skipped while the previous snapshot is still in flight."""
        if self.in_flight or not self.dirty:
            return False
        self.in_flight = True
        self.dirty = False

        def done(values: np.ndarray) -> None:
            self.in_flight = False
            callback(values)

        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            reader.submit(self.acc, done)
            self.acc.copy_(self._init)  # ordered after the copy and after every update, on the same stream
        return True


class DeviceTotals:
    """The accumulators of every device a loss or a norm lives on, and the reader that brings them home.

    ``publish`` receives each snapshot with the time it was taken. Not thread-safe: the owner holds its lock.
    """

    def __init__(self, publish: Callable[[np.ndarray, float], None]) -> None:
        self.reader = AsyncReader()
        self._publish = publish
        self._accumulators: Dict[torch.device, StepAccumulator] = {}

    def on(self, device: torch.device) -> StepAccumulator:
        acc = self._accumulators.get(device)
        if acc is None:
            acc = self._accumulators[device] = StepAccumulator(device)
        return acc

    def close_loss(self, weight: int) -> None:
        """Close the open step's loss on every device (see ``StepAccumulator.close_loss``)."""
        for acc in self._accumulators.values():
            acc.close_loss(weight)

    def snapshot(self, when: float) -> None:
        """Start copying out what every accumulator holds (those not still in flight)."""
        for acc in self._accumulators.values():
            acc.snapshot(self.reader, lambda v, when=when: self._publish(v, when))

    def in_flight(self) -> bool:
        return any(acc.in_flight for acc in self._accumulators.values())


