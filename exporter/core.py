"""``TrainingExporter``: the in-process exporter a training loop talks to."""
from __future__ import annotations

import logging
import numbers
import re
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

from . import __version__, runtime
from .collector import RunState
from .device_stats import AsyncReader, GradStats, StepAccumulator
from .server import MetricsServer

log = logging.getLogger("exporter")

_STATUSES = ("completed", "failed", "interrupted")
_LABEL_VALUE_MAX = 120
_MAX_SPLITS = 16
_LABEL_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
_CPU = torch.device("cpu")


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real)


def _check_number(where: str, name: str, value: Any) -> None:
    if value is not None and not _is_number(value):
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{where}: {name} must be a number or a one-element tensor, got {what}")


def _check_count(where: str, name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {value}")


def _config_labels(config: Optional[Mapping[str, Any]], limit: int) -> Tuple[Dict[str, str], int]:
    """Flatten ``config`` into ``config_<key>`` label pairs, at most ``limit``; returns (labels, dropped)."""
    if config is None:
        return {}, 0
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    flat: List[Tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}_{k}" if prefix else str(k), v)
        else:
            flat.append((prefix, value))

    walk("", config)
    labels: Dict[str, str] = {}
    for key, value in flat[:limit]:
        name = "config_" + _LABEL_NAME_BAD.sub("_", key)
        labels[name] = str(value)[:_LABEL_VALUE_MAX]
    return labels, max(0, len(flat) - limit)


def _layer_groups(names: Sequence[str], depth: int, limit: int) -> Tuple[List[int], List[str], int]:
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


class TrainingExporter:
    """Publishes a training run's health as Prometheus metrics, served from a background thread.

    Example::

        with TrainingExporter(run="resnet50-lr3e-4", config={"lr": 3e-4}) as exp:
            exp.watch(model, optimizer)
            for x, y in loader:
                loss = criterion(model(x), y)
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                exp.log_step(loss=loss, samples=len(x))

    Nothing here synchronises the training thread with the device: tensors are read back asynchronously and
    published once their copy has completed, usually one step later.
    """

    def __init__(self, run: Optional[str] = None, *, port: Optional[int] = None, addr: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, registry: Optional[CollectorRegistry] = None,
                 max_window: float = 60.0, detail_every: int = 25, layer_depth: int = 1, max_layers: int = 16,
                 max_eval_series: int = 32, max_config_labels: int = 32) -> None:
        for name, value in (("detail_every", detail_every), ("max_layers", max_layers),
                            ("max_eval_series", max_eval_series), ("max_config_labels", max_config_labels),
                            ("layer_depth", layer_depth)):
            _check_count("TrainingExporter()", name, value)
        if not _is_number(max_window) or max_window <= 0:
            raise ValueError(f"TrainingExporter(): max_window must be a positive number of seconds, got {max_window!r}")
        self.placement = runtime.placement()
        self.run = runtime.resolve_run(run)
        self.rank = self.placement.rank
        port = runtime.resolve_port(port, self.placement.local_rank)
        addr = runtime.resolve_addr(addr)
        config_labels, config_dropped = _config_labels(config, max_config_labels)
        info = {"world_size": str(self.placement.world_size), "local_rank": str(self.placement.local_rank),
                "host": socket.gethostname(), "version": __version__, **config_labels}

        self._detail_every = detail_every
        self._layer_depth = layer_depth
        self._max_layers = max_layers
        self._max_eval_series = max_eval_series
        self._reader = AsyncReader()
        self._accumulators: Dict[torch.device, StepAccumulator] = {}
        self._watched: List[Tuple[Any, GradStats, List[str]]] = []  # (optimizer or None, stats, layer names)
        self._hooks: List[Any] = []
        self._pending_grad: Optional[torch.Tensor] = None
        self._stepped = False
        self._optimizer_steps = 0
        self._last_step_clock: Optional[float] = None
        self._faulted: set = set()
        self._closed = False

        self.state = RunState(self.run, self.rank, info, float(max_window), refresh=self._refresh)
        self.state.dropped["config"] += config_dropped
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        registry.register(self.state)
        self._server: Optional[MetricsServer] = MetricsServer(port, addr, registry)
        self.port: int = self._server.port
        self.addr = addr
        log.info("serving metrics of run %r rank %d on http://%s:%d/metrics", self.run, self.rank, addr, self.port)

    # ----------------------------------------------------------------------------------------------- hooks
    def watch(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Publish gradient statistics and learning rates on every ``optimizer.step()``, through hooks.

        Without an optimizer, gradient statistics are taken at ``log_step`` from the model's gradients, so call
        it before ``zero_grad()`` in that case.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch(): model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"watch(): optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if optimizer is not None and any(opt is optimizer for opt, _, _ in self._watched):
            raise ValueError("watch(): this optimizer is already watched; its steps would be counted twice")
        self._check_open("watch()")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if optimizer is not None:
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            named = [(n, p) for n, p in named if id(p) in in_optimizer]
        names = [n for n, _ in named]
        params = [p for _, p in named]
        if self._layer_depth > 0 and self._max_layers > 0:
            groups, layers, merged = _layer_groups(names, self._layer_depth, self._max_layers)
            with self.state.lock:
                self.state.dropped["layer"] += merged
            stats = GradStats(params, groups, len(layers))
        else:
            stats, layers = GradStats(params), []
        index = len(self._watched)
        self._watched.append((optimizer, stats, layers))
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: self._before_optimizer_step(index)))
            self._hooks.append(optimizer.register_step_post_hook(
                lambda opt, args, kwargs: self._after_optimizer_step(index, opt)))

    def _before_optimizer_step(self, index: int) -> None:
        try:
            self._take_grad_stats(index)
        except Exception as exc:  # a fault of ours must never break the training step
            self._fault("hook", exc)

    def _after_optimizer_step(self, index: int, optimizer: torch.optim.Optimizer) -> None:
        try:
            self._stepped = True
            prefix = f"{index}." if index else ""
            for i, group in enumerate(optimizer.param_groups):
                self._publish_lr(prefix + str(i), group.get("lr"))
        except Exception as exc:
            self._fault("hook", exc)

    def _take_grad_stats(self, index: int) -> None:
        _, stats, layers = self._watched[index]
        norm, layer_norms = stats.compute()
        if norm is None:
            return
        # Two optimizers stepping in one training step (GANs): their norms combine into one global norm.
        if self._pending_grad is not None:
            norm = (self._pending_grad.square() + norm.to(self._pending_grad.device).square()).sqrt()
        self._pending_grad = norm
        with self.state.lock:
            if layer_norms is not None:
                self._reader.submit(layer_norms, lambda v: self.state.layer_norms.update(zip(layers, map(float, v))))
            self._optimizer_steps += 1
            if self._detail_every and self._optimizer_steps % self._detail_every == 0:
                mean = stats.mean()
                if mean is not None:
                    self._reader.submit(mean, lambda v: setattr(self.state, "grad_mean", float(v)))

    def _publish_lr(self, group: str, lr: Any) -> None:
        if isinstance(lr, torch.Tensor):
            with self.state.lock:
                self._reader.submit(lr.reshape(()), lambda v: self.state.lrs.__setitem__(group, float(v)))
        elif lr is not None:
            with self.state.lock:
                self.state.lrs[group] = float(lr)

    def _fault(self, where: str, exc: BaseException) -> None:
        with self.state.lock:
            self.state.errors[where] += 1
        if where not in self._faulted:
            self._faulted.add(where)
            log.error("training exporter: fault in %s, counted in training_exporter_errors_total and "
                      "not raised into training (logged once)", where, exc_info=exc)

    # ------------------------------------------------------------------------------------------ logging API
    def log_step(self, loss: Any = None, *, samples: Optional[int] = None, grad_norm: Any = None, lr: Any = None,
                 step: Optional[int] = None) -> None:
        """Mark the end of one optimizer step; ``loss`` may be a number or a 0-dim tensor on any device."""
        where = "log_step()"
        _check_number(where, "loss", loss)
        _check_number(where, "grad_norm", grad_norm)
        _check_count(where, "samples", samples)
        _check_count(where, "step", step)
        lrs = self._check_lr(lr)
        self._check_open(where)
        try:
            self._log_step(loss, samples, grad_norm, lrs, step)
        except Exception as exc:
            self._fault("log", exc)

    def _log_step(self, loss, samples, grad_norm, lrs, step) -> None:
        now = time.time()
        clock = time.perf_counter()
        skipped = any(opt is not None for opt, _, _ in self._watched) and not self._stepped
        for i, (opt, _, _) in enumerate(self._watched):
            if opt is None:  # watched without an optimizer: gradients are read here
                self._take_grad_stats(i)
        norm = grad_norm if grad_norm is not None else self._pending_grad
        self._pending_grad = None
        self._stepped = False

        loss_t = self._as_tensor(loss)
        norm_t = self._as_tensor(norm)
        with self.state.lock:
            if loss_t is not None and norm_t is not None and loss_t.device != norm_t.device:
                self._accumulator(loss_t.device).add(loss_t, None, skipped)
                self._accumulator(norm_t.device).add(None, norm_t, skipped)
            elif loss_t is not None or norm_t is not None:
                device = (loss_t if loss_t is not None else norm_t).device
                self._accumulator(device).add(loss_t, norm_t, skipped)
            for acc in self._accumulators.values():
                acc.snapshot(self._reader, lambda v, when=now: self.state.merge_steps(v, when))
            self._apply(self._reader.poll())

            st = self.state
            st.step = step if step is not None else st.step + 1
            st.last_step_time = now
            if samples is not None:
                st.samples += samples
            if skipped:
                st.skipped += 1
            if self._last_step_clock is not None:
                st.duration_sum += clock - self._last_step_clock
                st.duration_count += 1
            for group, value in lrs.items():
                self._publish_lr(group, value)
        self._last_step_clock = clock

    def log_eval(self, split: str, *, loss: Any = None, metrics: Optional[Mapping[str, Any]] = None,
                 step: Optional[int] = None) -> None:
        """Publish an evaluation: ``split`` such as "val" or "test", its loss and task metrics (numbers or tensors)."""
        where = "log_eval()"
        if not isinstance(split, str):
            raise TypeError(f"{where}: split must be a string such as 'val', got {type(split).__name__}")
        if not split:
            raise ValueError(f"{where}: split must be a non-empty string such as 'val'")
        if split == "train":
            raise ValueError(f"{where}: split 'train' is reserved for log_step(); use 'val', 'test', ...")
        _check_number(where, "loss", loss)
        _check_count(where, "step", step)
        if metrics is not None and not isinstance(metrics, Mapping):
            raise TypeError(f"{where}: metrics must be a mapping of name to number, got {type(metrics).__name__}")
        for name, value in (metrics or {}).items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"{where}: metric names must be non-empty strings, got {name!r}")
            _check_number(where, f"metric {name!r}", value)
        self._check_open(where)
        with self.state.lock:
            st = self.state
            if split not in st.eval_steps and len(st.eval_steps) >= _MAX_SPLITS:
                st.dropped["eval"] += 1
                return
            st.evals[split] = st.evals.get(split, 0) + 1
            if loss is not None:
                self._set_value(loss, lambda v: st.eval_loss(split, v))
            for name, value in (metrics or {}).items():
                key = (split, name)
                if key not in st.eval_metrics and len(st.eval_metrics) >= self._max_eval_series:
                    st.dropped["eval"] += 1
                    continue
                st.eval_metrics.setdefault(key, float("nan"))
                self._set_value(value, lambda v, key=key: st.eval_metrics.__setitem__(key, v))
            st.eval_steps[split] = step if step is not None else st.step
            st.eval_times[split] = time.time()

    def set_epoch(self, epoch: int) -> None:
        """Publish the current epoch."""
        _check_count("set_epoch()", "epoch", epoch)
        with self.state.lock:
            self.state.epoch = int(epoch)

    def close(self, status: str = "completed", *, stop_server: bool = False) -> None:
        """Publish that the run ended (``completed``, ``failed`` or ``interrupted``) and remove the hooks.

        ``/metrics`` keeps being served until the process exits (or ``stop_server=True``), so that Prometheus
        scrapes the final state and no hung or target-down alert fires for a finished run.
        """
        if status not in _STATUSES:
            raise ValueError(f"close(): status must be one of {', '.join(_STATUSES)}, got {status!r}")
        if not self._closed:
            self._closed = True
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
            with self.state.lock:
                for acc in self._accumulators.values():
                    acc.snapshot(self._reader, lambda v, when=time.time(): self.state.merge_steps(v, when))
                self._apply(self._reader.flush())
                self.state.status = status
        if stop_server and self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "TrainingExporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("failed")

    # ------------------------------------------------------------------------------------------- internals
    def _check_open(self, where: str) -> None:
        if self._closed:
            raise RuntimeError(f"{where} called after close() on the exporter of run {self.run!r}")

    @staticmethod
    def _check_lr(lr: Any) -> Dict[str, Any]:
        if lr is None:
            return {}
        if _is_number(lr):
            return {"0": lr}
        if isinstance(lr, Sequence) and not isinstance(lr, str):
            for i, value in enumerate(lr):
                _check_number("log_step()", f"lr[{i}]", value)
            return {str(i): value for i, value in enumerate(lr)}
        raise TypeError(f"log_step(): lr must be a number, a one-element tensor or a sequence of them (one per "
                        f"param group), got {type(lr).__name__}")

    @staticmethod
    def _as_tensor(value: Any) -> Optional[torch.Tensor]:
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return value.detach().reshape(())
        return torch.tensor(float(value), dtype=torch.float64)

    def _accumulator(self, device: torch.device) -> StepAccumulator:
        acc = self._accumulators.get(device)
        if acc is None:
            acc = self._accumulators[device] = StepAccumulator(device)
        return acc

    def _set_value(self, value: Any, setter) -> None:
        """Publish a number now, a tensor once its asynchronous copy has completed. Call with the lock held."""
        if isinstance(value, torch.Tensor):
            self._reader.submit(value.reshape(()), lambda v: setter(float(v)))
        else:
            setter(float(value))

    def _apply(self, ready) -> None:
        for callback, values in ready:
            try:
                callback(values)
            except Exception as exc:
                self._fault("reader", exc)

    def _refresh(self) -> None:
        try:
            with self.state.lock:
                self._apply(self._reader.poll())
        except Exception as exc:
            self._fault("collect", exc)
