"""Aten ops the exporter dispatches per optimizer step, counted with a ``TorchDispatchMode`` (views count too).

    python benchmarks/dispatch_count.py [--tensors 10 100 1000]

A step's count is the ops of one training step with the exporter minus those of the same step without it (the
loop's own ops, the clipping pass included, are identical). A snapshot (at most one a second from the training
thread, one per scrape, and a fold when a ring of 256 steps fills) is counted on its own.
"""
import argparse
import collections
import contextlib
import time
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from exporter import TrainingExporter


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def model_of(tensors: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(tensors)])


VARIANTS: Dict[str, dict] = {
    "defaults": {},
    "per-layer detail on (detail_every=1)": {"detail_every": 1},
    "grad_norm passed (torch clip)": {},
    "fused clip": {},
}


def _count(tensors: int, variant: Optional[str], loop_clips: bool, device: str = "cpu") -> collections.Counter:
    """Ops of one steady-state step of ``variant`` (None: the loop without the exporter); ``loop_clips``: the loop
    calls ``torch.nn.utils.clip_grad_norm_`` (the fused clip variant calls the exporter's instead)."""
    torch.manual_seed(0)
    model = model_of(tensors).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4, device=device)
    exp = None
    if variant is not None:
        exp = TrainingExporter(run="dispatch", port=0, addr="127.0.0.1", handle_sigterm=False, **VARIANTS[variant])
        exp.watch(model, optimizer)
        exp._totals._period = float("inf")  # only the first step snapshots: a snapshot is counted on its own

    def step(counter: Optional[OpCounter]) -> None:
        loss = model(x).square().mean()
        loss.backward()
        with counter if counter is not None else contextlib.nullcontext():
            norm = None
            if variant == "fused clip":
                exp.clip_grad_norm_(model.parameters(), 1.0)
            elif loop_clips:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if exp is not None:
                exp.log_step(loss=loss, grad_norm=norm if variant == "grad_norm passed (torch clip)" else None)
        optimizer.zero_grad()

    try:
        for _ in range(3):  # lazy initialisation: layouts, rings, the first snapshot
            step(None)
        counter = OpCounter()
        step(counter)
        return counter.ops
    finally:
        if exp is not None:
            exp.close(stop_server=True)


def exporter_ops(tensors: int, variant: str, device: str = "cpu") -> Tuple[int, Dict[str, int]]:
    """The exporter's ops in one step of ``variant``: the loop with it, minus the same loop without it (the
    total, and the difference per op)."""
    clipping = "clip" in variant
    with_it = _count(tensors, variant, clipping, device)
    bare = _count(tensors, None, clipping, device)
    per_op = {op: with_it[op] - bare[op] for op in with_it | bare if with_it[op] != bare[op]}
    return sum(with_it.values()) - sum(bare.values()), per_op


def snapshot_ops(tensors: int) -> int:
    """Ops of one snapshot (fold of the rings, copy out, reset) after a step with defaults."""
    model = model_of(tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    exp = TrainingExporter(run="dispatch", port=0, addr="127.0.0.1", handle_sigterm=False)
    exp.watch(model, optimizer)
    exp._totals._period = float("inf")  # only the first step snapshots
    try:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            exp.log_step(loss=torch.tensor(1.0))
        exp._totals.reader.flush()
        counter = OpCounter()
        with exp.state.lock, counter:
            exp._totals.snapshot(time.time())
        return sum(counter.ops.values())
    finally:
        exp.close(stop_server=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU; aten ops the exporter adds to one optimizer step "
          f"(watch(model, optimizer) + log_step(loss=tensor))\n")
    print("| variant | " + " | ".join(f"{n} tensors" for n in args.tensors) + " |")
    print("| --- |" + " --- |" * len(args.tensors))
    detail = {}
    for variant in VARIANTS:
        counts = [exporter_ops(n, variant) for n in args.tensors]
        detail[variant] = counts[-1][1]
        print(f"| {variant} | " + " | ".join(str(total) for total, _ in counts) + " |")
    print("| one snapshot (fold + copy out + reset) | "
          + " | ".join(str(snapshot_ops(n)) for n in args.tensors) + " |")
    print(f"\nper op, at {args.tensors[-1]} tensors:")
    for variant, ops in detail.items():
        print(f"- {variant}: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items())))


if __name__ == "__main__":
    main()
