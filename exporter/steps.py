"""The step model: what one optimizer step is, whether its update happened, and which values belong to it.

- With an optimizer watched, optimizer steps define the steps. The pre-step hook of each watched optimizer takes
  its gradient statistics; a training step is open from the first watched optimizer's step until one of them
  steps again or ``log_step`` is called, so two optimizers of one step (a GAN) make one step with one global norm.
  With a gradient scaler passed to ``watch``, an optimizer that the scaler skipped (``scaler.step`` found
  infinite gradients and did not call ``optimizer.step``) is known at ``scaler.update()`` without a host read:
  it was stepped through the scaler and its hook did not run. A skipped step is a step (``training_step``
  counts it) with no gradient norm, counted in ``training_scaler_skipped_steps_total``.
- ``log_step`` closes the open step and takes every step closed since the previous call. Losses logged while no
  step was closed (micro-batches of gradient accumulation) wait and fold into the next step as their mean;
  a loss logged for N closed steps (interval logging) stands for each of them. A non-finite loss is counted at
  once, whether or not an update follows. A ``grad_norm`` passed to ``log_step`` replaces the computed norm of
  the step it closes, the last one; a norm from ``clip_grad_norm_`` (``exporter.clip``) is the norm of the step
  that opens next, whose gradients the hooks then do not read.
- Without an optimizer, every ``log_step`` is one step and reads the gradients present then (call it before
  ``zero_grad()``); with a scaler passed, a step whose gradients the scaler found infinite is a skip, decided on
  the device from the scaler's own state.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .collector import RunState
from .device_stats import DeviceTotals
from .grads import GradStats, layer_groups, to_home, user_names
from .labels import bounded

log = logging.getLogger("exporter")


@dataclass
class Watched:
    """One ``watch()`` call: a model's parameters (those of ``optimizer`` when given) and how they are grouped."""

    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    scaler: Any
    prefix: str
    stats: GradStats = None
    layers: List[str] = field(default_factory=list)
    n_params: int = -1
    merged: int = 0
    cut: int = 0  # layer labels cut to the label length bound
    stepped: bool = False  # the optimizer's step ran since the scaler's last update
    layer_sq: Any = None  # the newest squared per-layer norms not yet copied out, their CUDA stream and labels


class StepModel:
    """Owns the hooks and the open step; closes steps into the device totals and the host state.

    Every method runs with ``state.lock`` held (the hooks take it), because a scrape snapshots the same totals.
    """

    def __init__(self, state: RunState, totals: DeviceTotals, fault: Callable[[str, BaseException], None], *,
                 rank: int, detail_every: int, layer_depth: int, max_layers: int) -> None:
        self.state = state
        self.totals = totals
        totals.before_snapshot = self.submit_layers
        self._fault = fault
        self._rank = rank
        self._detail_every = detail_every
        self._layer_depth = layer_depth
        self._max_layers = max_layers
        self.watched: List[Watched] = []
        self._hooks: List[Any] = []
        self._scalers: Dict[int, Any] = {}
        self._seen: set = set()  # ids of parameters already watched: each is counted once
        self._open: set = set()  # watched indices that stepped (or were skipped) in the open step
        self._open_norm: Optional[torch.Tensor] = None
        self._open_shard: Optional[torch.Tensor] = None
        self._open_skipped = False
        self._open_found_inf: Optional[torch.Tensor] = None
        self._open_clip: Optional[torch.Tensor] = None  # the open step's norm, from its clipping pass
        self._clip_next: Optional[torch.Tensor] = None  # a clipping pass's norm, for the step about to open
        self._closed = 0  # steps closed since the last log_step
        self._warned_no_grad = False
        self._optimizer_steps = 0
        # (watched index, param group index) -> its param_group label: "0", "1", ... continuing across optimizers
        # in the order they were watched; a group added later takes the next free index. Labels never change.
        self._lr_labels: Dict[Tuple[int, int], str] = {}

    @property
    def has_optimizer(self) -> bool:
        return any(w.optimizer is not None for w in self.watched)

    # ------------------------------------------------------------------------------------------- watching
    def watch(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], scaler: Any,
              name: Optional[str]) -> None:
        if optimizer is not None and any(w.optimizer is optimizer for w in self.watched):
            raise ValueError("watch(): this optimizer is already watched; its steps would be counted twice")
        named_models = [w for w in self.watched if w.layers]
        prefix = name if name is not None else (f"model{len(named_models)}" if named_models else "")
        w = Watched(model, optimizer, scaler, prefix)
        self._group(w)
        if not w.stats.params and optimizer is None:
            log.warning("watch(): every parameter of this model is already watched; each is counted once")
            return
        index = len(self.watched)
        self.watched.append(w)
        if optimizer is not None:
            for i in range(len(optimizer.param_groups)):
                self._lr_label(index, i)
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self._guard(self._pre_step, index)))
            self._hooks.append(optimizer.register_step_post_hook(lambda opt, *_: self._guard(self._post_step, index)))
        if scaler is not None and id(scaler) not in self._scalers:
            self._scalers[id(scaler)] = scaler
            original = scaler.update

            def update(*args, **kwargs):
                self._guard(self._scaler_update, scaler)
                return original(*args, **kwargs)

            scaler.update = update  # an instance attribute, removed at close; the class is untouched

    def _group(self, w: Watched) -> None:
        """(Re)build the watched parameters and their layer groups: all the model's parameters, trainable now or
        later (frozen ones have no gradient and count as zero), restricted to the optimizer's when given."""
        named = user_names(w.model)
        if w.optimizer is not None:
            in_optimizer = {id(p) for g in w.optimizer.param_groups for p in g["params"]}
            named = [(n, p) for n, p in named if id(p) in in_optimizer]
            w.n_params = sum(len(g["params"]) for g in w.optimizer.param_groups)
        mine = {id(p) for p in (w.stats.params if w.stats is not None else ())}
        named = [(n, p) for n, p in named if id(p) in mine or id(p) not in self._seen]
        self._seen.update(id(p) for _, p in named)
        params = [p for _, p in named]
        if self._layer_depth > 0 and self._max_layers > 0 and named:
            groups, layers, merged = layer_groups([n for n, _ in named], self._layer_depth, self._max_layers)
            labels = [bounded(f"{w.prefix}/{layer}" if w.prefix else layer) for layer in layers]
            cut = sum(was_cut for _, was_cut in labels)
            # A regrouping counts only new merges and cuts.
            self.state.dropped["layer"] += max(0, merged - w.merged) + max(0, cut - w.cut)
            w.merged, w.cut = max(merged, w.merged), max(cut, w.cut)
            w.layers = [label for label, _ in labels]
            w.stats = GradStats(params, groups, len(layers), self._rank)
        else:
            w.stats, w.layers = GradStats(params, rank=self._rank), []

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for scaler in self._scalers.values():
            scaler.__dict__.pop("update", None)
        self._scalers.clear()

    def _guard(self, fn, *args) -> None:
        not_capturing("an optimizer hook")
        try:
            with self.state.lock, torch.no_grad():
                fn(*args)
        except Exception as exc:  # a fault of ours must never break the training step
            self._fault("hook", exc)

    # ------------------------------------------------------------------------------------------- events
    def _pre_step(self, index: int) -> None:
        if index in self._open:
            self.close_step()
        self._open.add(index)
        self._take_clip()
        w = self.watched[index]
        w.stepped = True
        if w.n_params != sum(len(g["params"]) for g in w.optimizer.param_groups):  # add_param_group
            self._group(w)
        self._take_stats(w)

    def _post_step(self, index: int) -> None:
        w = self.watched[index]
        for i, group in enumerate(w.optimizer.param_groups):
            self.publish_lr(self._lr_label(index, i), group.get("lr"))

    def _lr_label(self, index: int, group: int) -> str:
        return self._lr_labels.setdefault((index, group), str(len(self._lr_labels)))

    def _scaler_update(self, scaler: Any) -> None:
        states = getattr(scaler, "_per_optimizer_states", {})
        for index, w in enumerate(self.watched):
            if w.scaler is not scaler:
                continue
            if w.optimizer is None:
                # Gradients are read at log_step: whether the scaler found them infinite is decided on the device.
                found = [t for st in states.values() for t in st.get("found_inf_per_device", {}).values()]
                if found:
                    self._open_found_inf = torch.stack([t.reshape(()).to(found[0].device) for t in found]).sum() > 0
                continue
            stage = states.get(id(w.optimizer), {}).get("stage")
            if getattr(stage, "name", "") == "STEPPED" and not w.stepped:  # scaler.step() skipped optimizer.step()
                if index in self._open:
                    self.close_step()
                self._open.add(index)
                self._take_clip()
                self._open_skipped = True
            w.stepped = False

    def clipped(self, norm: torch.Tensor) -> None:
        """The clipping pass of the coming step computed its global norm (see ``exporter.clip``)."""
        self._clip_next = norm

    def _take_clip(self) -> None:
        if self._clip_next is not None:
            self._open_clip, self._clip_next = self._clip_next, None

    def _take_stats(self, w: Watched) -> bool:
        """Read ``w``'s gradients for the open step; False when it has none."""
        self._optimizer_steps += 1
        detail = bool(self._detail_every) and self._optimizer_steps % self._detail_every == 0
        if self._open_clip is not None and not detail:
            return True  # the clipping pass computed this step's norm: no second read of the gradients
        norms = w.stats.compute()
        if norms is None:
            return False
        self._open_norm = norms.total if self._open_norm is None else _hypot(self._open_norm, norms.total)
        if norms.shard_sq is not None:
            self._open_shard = _combine(self._open_shard, norms.shard_sq)
        if norms.group_sq is not None:  # a gauge: the newest is copied out at the next snapshot, not every step
            w.layer_sq = (norms.group_sq, _stream(norms.group_sq.device), w.layers)
        if detail:
            mean = w.stats.mean()
            if mean is not None:
                st = self.state
                self.totals.reader.submit(mean, lambda v: setattr(st, "grad_mean", float(v)))
        return True

    def submit_layers(self) -> None:
        """Start copying out the newest per-layer norms (called with each snapshot of the device totals)."""
        st = self.state
        for w in self.watched:
            if w.layer_sq is None:
                continue
            (sq, stream, layers), w.layer_sq = w.layer_sq, None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.totals.reader.submit(sq.sqrt(), lambda v, layers=layers: st.layer_norms.update(
                    zip(layers, map(float, v))))

    def close_step(self, grad_norm: Optional[torch.Tensor] = None) -> None:
        """Close the open step: one more step, its gradient norm (``grad_norm`` when the user passed one)."""
        norm = next((n for n in (grad_norm, self._open_clip, self._open_norm) if n is not None), None)
        if norm is not None:
            skipped = self._open_found_inf if self._open_found_inf is not None else self._open_skipped
            self.totals.on(norm.device).add_grad(norm, skipped)
        if self._open_shard is not None:
            st = self.state
            self.totals.reader.submit(self._open_shard, lambda v: setattr(st, "grad_shard_sq", float(v)))
        if self._open_skipped:
            self.state.skipped += 1
        self.state.step += 1
        self._closed += 1
        self._open.clear()
        self._open_norm = self._open_shard = self._open_found_inf = self._open_clip = None
        self._open_skipped = False

    # ------------------------------------------------------------------------------------------- log_step
    def log_step(self, loss: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor]) -> int:
        """Close what ``log_step`` closes and fold the loss in; returns the number of optimizer steps it closed."""
        model_only = [w for w in self.watched if w.optimizer is None]
        if not self.has_optimizer or self._open:
            self._take_clip()
            read = [self._take_stats(w) for w in model_only]
            if model_only and not any(read) and grad_norm is None and not self._warned_no_grad:
                self._warned_no_grad = True
                log.warning("watch(model) without an optimizer reads the gradients at log_step(), and none was "
                            "there: call log_step() before zero_grad(), or watch(model, optimizer) (warned once)")
            self.close_step(grad_norm)
        if loss is not None:
            self.totals.on(loss.device).log_loss(loss, self._closed)
        closed, self._closed = self._closed, 0
        if closed:
            self.totals.close_loss(closed)
        return closed

    def finish(self) -> None:
        """At close: the step still open is closed; micro-batch losses of a step that never came are dropped
        (their non-finite ones were already counted)."""
        if self._open:
            self.close_step()
        self._closed = 0
        self.totals.close_loss(0)

    def publish_lr(self, group: str, lr: Any) -> None:
        if isinstance(lr, torch.Tensor):
            st = self.state
            self.totals.reader.submit(lr.reshape(()), lambda v: st.lrs.__setitem__(group, float(v)))
        elif lr is not None:
            self.state.lrs[group] = float(lr)


def not_capturing(where: str) -> None:
    """Raise a clear error inside a CUDA graph capture: the exporter's reads would be recorded once and replayed
    blindly, and its host-side bookkeeping would not run at replay."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"training exporter: {where} ran inside a CUDA graph capture, which it cannot follow. "
                           "Watch the model without its optimizer (exp.watch(model)) and call exp.log_step() after "
                           "graph.replay(), outside the capture: it then reads the graph's static gradients.")


def _stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _hypot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The L2 norm of two norms, on an accelerator when either is on one."""
    home = a.device if a.device.type != "cpu" else b.device
    return torch.hypot(to_home(a, home), to_home(b, home))


def _combine(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """a + b, added on an accelerator when either is on one (see ``grads.to_home``)."""
    if a is None:
        return b
    home = a.device if a.device.type != "cpu" else b.device
    return to_home(a, home) + to_home(b, home)
