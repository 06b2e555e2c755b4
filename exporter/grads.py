"""Gradient statistics on the device: global, per-layer-group and per-shard L2 norms of a watched model.

Every parameter the model may train has a fixed slot, whether or not it has a gradient this step (frozen,
unused experts, skipped branches): absent gradients count as zero, so the grouping is computed once per device
and parameter set instead of once per set of gradients present. Norms are reduced in fp32 or wider, whatever the
gradients' dtype, and the parts of several devices are combined on an accelerator, where stream order makes
every copy land before it is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

# Components that wrappers add to parameter names; never a user's module name.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def user_names(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) pairs named as the user's code names them, through wrappers."""
    return [(".".join(c for c in name.split(".") if c not in _WRAPPER_PARTS), p)
            for name, p in unwrap(model).named_parameters()]


def layer_groups(names: Sequence[str], depth: int, limit: int) -> Tuple[List[int], List[str], int]:
    """Group parameter names by their first ``depth`` module components, at most ``limit`` groups.

    Groups past the limit share one more group, "other"; returns (group index per name, group names, merged).
    """
    keys = [".".join(name.split(".")[:-1][:depth]) or "(root)" for name in names]
    index: Dict[str, int] = {}
    for key in keys:
        if key not in index:
            index[key] = min(len(index), limit)
    labels = [key for key, i in index.items() if i < limit]
    merged = len(index) - len(labels)
    if merged:
        labels.append("other")
    return [index[key] for key in keys], labels, merged


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed support
        return None
    return DTensor


def _local(t: torch.Tensor, dtensor) -> torch.Tensor:
    if dtensor is not None and isinstance(t, dtensor):
        t = t.to_local()  # this rank's shard, no communication
    if t.is_sparse:
        t = t.coalesce()._values()
    return t.detach()


def _runs(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A device tensor of ``values`` made from fills of equal runs: no copy from host memory."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            parts.append(torch.full((i - start,), values[start], dtype=dtype, device=device))
            start = i
    return torch.cat(parts)


def _reduce_dtype(device: torch.device, wide: bool) -> torch.dtype:
    """fp32 on accelerators (tree reductions keep it accurate; fp64 is slow on many GPUs), fp64 on the CPU, whose
    vectorised sums accumulate long runs (and where fp64 costs no more), fp64 kept for fp64 gradients."""
    return torch.float64 if wide or device.type == "cpu" else torch.float32


def to_home(t: torch.Tensor, home: torch.device) -> torch.Tensor:
    """Move a small result to ``home`` without a host synchronisation, landing before any later read."""
    if t.device == home:
        return t
    if t.device.type == "cpu":  # a pinned source makes the copy asynchronous; its buffer lives until it lands
        t = t.pin_memory()
    return t.to(home, non_blocking=True)


class Norms(NamedTuple):
    """One step's norms on the home device: the global L2 norm (fp64), the squared norm of each layer group (or
    None), this rank's share of the squared global sum when gradients are sharded (or None)."""

    total: torch.Tensor
    group_sq: Optional[torch.Tensor]
    shard_sq: Optional[torch.Tensor]


@dataclass
class _Layout:
    """The parameters of one device and width class, with their device-side group index and ownership."""

    device: torch.device
    wide: bool  # float64 gradients, reduced in fp64 everywhere
    slots: List[int]
    zero: torch.Tensor
    index: Optional[torch.Tensor]
    owned: Optional[torch.Tensor]


class GradStats:
    """Global, per-layer-group and per-shard gradient L2 norms with a constant number of kernels per device.

    ``params`` is a fixed list of parameters; ``groups[i]`` is the layer-group index of ``params[i]`` (or None
    for no per-layer norms). ``rank`` decides which replicated gradients count in this rank's shard share.
    """

    def __init__(self, params: Sequence[nn.Parameter], groups: Optional[Sequence[int]] = None,
                 n_groups: int = 0, rank: int = 0) -> None:
        self.params = list(params)
        self.groups = list(groups) if groups is not None else None
        self.n_groups = n_groups
        self.rank = rank
        self._dtensor = _dtensor_type()
        self.sharded = self._dtensor is not None and any(isinstance(p, self._dtensor) for p in self.params)
        self.layouts: Dict[Tuple[torch.device, bool], _Layout] = {}  # one per device and width: bounded

    def _owned(self, p: nn.Parameter) -> float:
        """1 where this rank's copy of ``p``'s gradient counts toward the global sum: its own shard, or the first
        replica along every mesh dimension that is not sharded; plain tensors are replicas (DDP) counted on rank 0."""
        if isinstance(p, self._dtensor):
            coordinate = p.device_mesh.get_coordinate()
            if coordinate is None:
                return 0.0
            return float(all(c == 0 for c, pl in zip(coordinate, p.placements) if not pl.is_shard()))
        return float(self.rank == 0)

    def _build(self) -> None:
        by_class: Dict[Tuple[torch.device, bool], List[int]] = {}
        for i, p in enumerate(self.params):
            by_class.setdefault((p.device, p.dtype == torch.float64), []).append(i)
        self.layouts = {}
        for (device, wide), slots in by_class.items():
            zero = torch.zeros((), dtype=_reduce_dtype(device, wide), device=device)
            index = _runs([self.groups[i] for i in slots], torch.long, device) if self.groups is not None else None
            owned = (_runs([self._owned(self.params[i]) for i in slots], torch.float64, device)
                     if self.sharded else None)
            self.layouts[(device, wide)] = _Layout(device, wide, slots, zero, index, owned)

    def compute(self) -> Optional[Norms]:
        """This step's norms, or None when no watched parameter has a gradient. Three ops per device and width
        class (``_foreach_norm``, one stack, one norm of the stack), whatever the number of parameters; per-layer
        groups add four (a cast, a square, a zero fill, ``index_add_``)."""
        if not self.layouts:
            self._build()
        parts = []
        with torch.no_grad():
            for layout in self.layouts.values():
                grads, at = [], []
                for k, i in enumerate(layout.slots):
                    g = self.params[i].grad
                    if g is not None:
                        grads.append(_local(g, self._dtensor) if self.sharded or g.is_sparse else g)
                        at.append(k)
                if not grads:
                    continue
                if any(g.device != layout.device for g in grads):  # the model moved since the layout was built
                    self.layouts = {}
                    return self.compute()
                norms = torch._foreach_norm(grads, 2, dtype=layout.zero.dtype)
                if len(at) < len(layout.slots):  # absent gradients count as zero, in their fixed slots
                    full = [layout.zero] * len(layout.slots)
                    for k, n in zip(at, norms):
                        full[k] = n
                    norms = full
                stacked = torch.stack(norms)
                parts.append((layout, stacked, torch.linalg.vector_norm(stacked, dtype=torch.float64)))
            if not parts:
                return None
            home = next((layout.device for layout, _, _ in parts if layout.device.type != "cpu"), parts[0][0].device)
            total = group = shard = None
            for layout, stacked, norm in parts:
                total = norm if total is None else torch.hypot(to_home(total, home), to_home(norm, home))
                if layout.index is not None or layout.owned is not None:
                    sq = stacked.to(torch.float64).square()
                    if layout.index is not None:
                        g = torch.zeros(self.n_groups, dtype=torch.float64, device=layout.device)
                        g.index_add_(0, layout.index, sq)
                        group = _add(group, to_home(g, home))
                    if layout.owned is not None:
                        shard = _add(shard, to_home((sq * layout.owned).sum(), home))
        return Norms(to_home(total, home), group, shard)

    def mean(self) -> Optional[torch.Tensor]:
        """Mean over parameters of each gradient's mean (the seed's ``grad_mean``): one small kernel per tensor,
        so it runs on an interval, not every step."""
        grads = [p.grad if not (self.sharded or p.grad.is_sparse) else _local(p.grad, self._dtensor)
                 for p in self.params if p.grad is not None]
        if not grads:
            return None
        home = next((g.device for g in grads if g.device.type != "cpu"), grads[0].device)
        with torch.no_grad():
            means = [g.mean(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32) for g in grads]
            return torch.stack([to_home(m, home) for m in means]).mean()


def _add(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b
