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


# Rings: one row per event, written with one copy each; the columns after the value default to the blank row's.
_RING = 256  # rows; a full ring folds into the running totals, so the fold's cost is amortised over its rows
L_VALUE, L_WEIGHT, L_KIND = range(3)  # loss ring
RAW, STEP, MEAN = 0.0, 1.0, 2.0  # loss row kinds: a micro-batch loss, one step's loss, a closed micro-batch mean
G_VALUE, G_SKIP, G_EXPECTED = range(3)  # gradient ring
SQ_LIMIT = 1e150  # values beyond it add no squared term: their square would overflow fp64 to +Inf


class _Ring:
    """A preallocated (rows x 3) fp64 buffer and a 0-dim view of every cell, so a write is one op, no view."""

    def __init__(self, blank: List[float], device: torch.device) -> None:
        self.blank = torch.empty(_RING, len(blank), dtype=torch.float64, device=device)
        for column, value in enumerate(blank):  # fills on the device, not a copy from the host
            self.blank[:, column] = value
        self.rows = self.blank.clone()
        self.cells = [row.unbind() for row in self.rows.unbind()]
        self.n = 0


class StepAccumulator:
    """Per-device sums, counts, maxima and last values of the train loss and the gradient norm.

    Each step writes its raw values into one row of a device ring (a loss, a norm: one copy each, whatever the
    number of parameters); every reduction (sums, sign-split and squared sums, counts, non-finite counts, maximum,
    last) runs once per fold over the filled rows, with a constant number of ops: at each snapshot, and when a ring
    fills. Nothing is read on the training thread; a snapshot is copied out by ``AsyncReader`` and the device
    totals reset, in stream order, so no step is lost or counted twice. Micro-batch losses wait on the device, as a
    sum and a count, until their optimizer step closes; each is also a row, so a non-finite one counts at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._init = torch.zeros(SKIPPED + 3, 2, dtype=torch.float64, device=device)
        self._init[MAX] = -np.inf  # fills on the device, not copies from the host
        self._init[LAST] = np.nan
        self.acc = self._init.clone()
        self._loss = _Ring([np.nan, 1.0, STEP], device)
        self._grad = _Ring([np.nan, 0.0, 0.0], device)
        self._pending = torch.zeros(2, dtype=torch.float64, device=device)  # finite micro-batch losses: sum, count
        self.pending = False
        self.dirty = False
        self.in_flight = False
        self._stream = None  # the CUDA stream the training thread updates on; a scrape snapshots on it too

    def _row(self, ring: _Ring) -> List[torch.Tensor]:
        if ring.n == _RING:
            self.fold()
        ring.n += 1
        self._touched()
        return ring.cells[ring.n - 1]

    @staticmethod
    def _put(cell: torch.Tensor, value: Union[torch.Tensor, float]) -> None:
        if isinstance(value, torch.Tensor):
            cell.copy_(value if value.dim() == 0 else value.reshape(()))
        else:
            cell.fill_(value)

    def log_loss(self, loss: torch.Tensor, closed: int) -> None:
        """A loss (0-dim, this device) logged with ``closed`` optimizer steps closed by the same call: alone, it is
        their loss; after micro-batches (or with none closed) it joins their mean. A non-finite one counts at once,
        so that a loop that skips its update for it, or a step that never comes, still shows it."""
        if closed and not self.pending:
            row = self._row(self._loss)
            self._put(row[L_VALUE], loss)
            if closed != 1:
                row[L_WEIGHT].fill_(closed)
            return
        row = self._row(self._loss)
        self._put(row[L_VALUE], loss)
        row[L_KIND].fill_(RAW)
        x = row[L_VALUE]
        finite = torch.isfinite(x)
        self._pending += torch.stack([torch.where(finite, x, 0.0), finite.to(torch.float64)])
        self.pending = True
        if closed:
            self.close_loss(closed)

    def close_loss(self, weight: int) -> None:
        """Close the waiting micro-batch losses: their finite mean stands for ``weight`` optimizer steps (interval
        logging: one loss for several steps; 0 drops it)."""
        if not self.pending:
            return
        total, n = self._pending[0], self._pending[1]
        row = self._row(self._loss)
        torch.div(total, n, out=row[L_VALUE])  # 0/0 is NaN: no finite loss, nothing to add (already counted)
        row[L_KIND].fill_(MEAN)
        if weight != 1:
            row[L_WEIGHT].fill_(weight)
        self._pending.zero_()
        self.pending = False

    def add_grad(self, norm: torch.Tensor, skipped: Union[bool, torch.Tensor, None] = None) -> None:
        """One optimizer step's global gradient norm. ``skipped`` marks a step a gradient scaler skipped: its
        non-finite norm is expected, not counted as non-finite. A device bool is the scaler's own verdict and is
        also counted as a skip; ``True`` is a skip the host already knows and counts."""
        row = self._row(self._grad)
        self._put(row[G_VALUE], norm)
        if isinstance(skipped, torch.Tensor):
            row[G_SKIP].copy_(skipped.reshape(()))
        elif skipped:
            row[G_EXPECTED].fill_(1.0)

    def fold(self) -> None:
        """Reduce the filled rows into the running totals and empty the rings."""
        if self._loss.n:
            rows = self._loss.rows[:self._loss.n]
            x, kind = rows[:, L_VALUE], rows[:, L_KIND]
            finite = torch.isfinite(x)
            counted = finite & (kind != RAW)
            bad = ~finite & (kind != MEAN)  # a closed mean is non-finite only when all its losses were, counted
            self._add(LOSS, x, rows[:, L_WEIGHT], counted, bad, None)
            self._loss.rows.copy_(self._loss.blank)
            self._loss.n = 0
        if self._grad.n:
            rows = self._grad.rows[:self._grad.n]
            x, skip = rows[:, G_VALUE], rows[:, G_SKIP]
            finite = torch.isfinite(x)
            bad = ~finite & ((rows[:, G_EXPECTED] + skip) == 0)
            self._add(GRAD, x, None, finite, bad, skip)
            self._grad.rows.copy_(self._grad.blank)
            self._grad.n = 0

    def _add(self, col: int, x: torch.Tensor, weight: Optional[torch.Tensor], counted: torch.Tensor,
             bad: torch.Tensor, skip: Optional[torch.Tensor]) -> None:
        kept = torch.where(counted, x, 0.0)
        squared = torch.where(kept.abs() <= SQ_LIMIT, kept, 0.0).square()
        terms = torch.stack([kept, counted.to(torch.float64), kept.clamp(min=0), (-kept).clamp(min=0), squared])
        if weight is not None:
            terms = terms * weight
        column = self.acc[:, col]
        column[:NONFINITE] += terms.sum(1)
        column[NONFINITE] += bad.sum()
        if skip is not None:
            column[SKIPPED] += skip.sum()
        torch.maximum(column[MAX], torch.where(counted, x, -np.inf).max(), out=column[MAX])
        shown = counted | bad  # the last value: of the last row that shows one
        last = (shown * torch.arange(1, len(x) + 1, device=x.device)).argmax()
        column[LAST] = torch.where(shown.take(last), x.take(last), column[LAST])  # take: no host read

    def _touched(self) -> None:
        self.dirty = True
        if self.device.type == "cuda":
            self._stream = torch.cuda.current_stream(self.device)

    def snapshot(self, reader: AsyncReader, callback: Callable[[np.ndarray], None]) -> bool:
        """Fold, copy the totals out and reset; skipped while the previous snapshot is still in flight."""
        if self.in_flight or not self.dirty:
            return False
        self.in_flight = True
        self.dirty = False

        def done(values: np.ndarray) -> None:
            self.in_flight = False
            callback(values)

        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            self.fold()
            reader.submit(self.acc, done)
            self.acc.copy_(self._init)  # ordered after the copy and after every update, on the same stream
        return True


class DeviceTotals:
    """The accumulators of every device a loss or a norm lives on, and the reader that brings them home.

    ``publish`` receives each snapshot with the time it was taken. Not thread-safe: the owner holds its lock.
    """

    def __init__(self, publish: Callable[[np.ndarray, float], None], period: float) -> None:
        self.reader = AsyncReader()
        self._publish = publish
        self._period = period
        self._accumulators: Dict[torch.device, StepAccumulator] = {}
        self._taken = -np.inf  # when the last snapshot was taken (wall clock, like the steps' times)
        self._stepped: Optional[float] = None  # when the newest step was logged
        self.before_snapshot: Optional[Callable[[], None]] = None  # the owner's gauges copied out with each snapshot

    def on(self, device: torch.device) -> StepAccumulator:
        acc = self._accumulators.get(device)
        if acc is None:
            acc = self._accumulators[device] = StepAccumulator(device)
        return acc

    def close_loss(self, weight: int) -> None:
        """Close the open step's loss on every device (see ``StepAccumulator.close_loss``)."""
        for acc in self._accumulators.values():
            acc.close_loss(weight)

    def snapshot(self, now: float, when: Optional[float] = None) -> None:
        """Start copying out what every accumulator holds (those not still in flight), as values of ``when``
        (default: the time of the newest logged step, which its rows belong to). ``now``: the wall clock."""
        self._taken = now
        if when is None:
            when = self._stepped if self._stepped is not None else now
        if self.before_snapshot is not None:
            self.before_snapshot()
        for acc in self._accumulators.values():
            acc.snapshot(self.reader, lambda v, when=when: self._publish(v, when))

    def before_step(self, now: float) -> None:
        """On the training thread, before a step's values: rows of steps more than ``period`` ago are taken with
        their own time, so a pause does not date them to the step after it."""
        if self._stepped is not None and now - self._stepped >= self._period:
            self.snapshot(now, self._stepped)

    def after_step(self, now: float) -> None:
        """On the training thread, after a step's values: a snapshot at most every ``period`` seconds (a scrape
        takes one too), so the reductions and the copy are amortised over the steps between."""
        self._stepped = now
        if now - self._taken >= self._period:
            self.snapshot(now)

    def in_flight(self) -> bool:
        return any(acc.in_flight for acc in self._accumulators.values())


