"""``TrainingExporter``: the in-process exporter a training loop talks to."""
from __future__ import annotations

import contextlib
import logging
import numbers
import socket
import time
from typing import Any, ContextManager, Dict, Mapping, Optional, Sequence, Union

import torch
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

from . import __version__, clip, runtime
from .collector import Publisher, RunState
from .device_stats import DeviceTotals
from .labels import ConfigLabels, bounded
from .lifecycle import Lifecycle, PhaseBlock
from .server import Endpoint, serve
from .steps import StepModel, not_capturing

log = logging.getLogger("exporter")

_STATUSES = ("completed", "failed", "interrupted")
_MAX_SPLITS = 16
_SCRAPE_WAIT = 1.0  # seconds a scrape waits for the device copies it started
_SNAPSHOT_PERIOD = 1.0  # seconds between the training thread's snapshots of the device totals
_BUCKETS = 16  # buckets of the recent maxima per max_window (collector.RunState)


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
    if _is_partial_dtensor(value):
        raise TypeError(f"{where}: {name} is a DTensor sharded or partial over ranks; pass {name}.full_tensor()")


def _is_partial_dtensor(value: Any) -> bool:
    placements = getattr(value, "placements", None) if isinstance(value, torch.Tensor) else None
    return placements is not None and not all(p.is_replicate() for p in placements)


def _check_count(where: str, name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {value}")




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

    On SIGTERM (preemption) the run publishes "interrupted" and the handler installed before runs as usual;
    ``handle_sigterm=False`` leaves SIGTERM alone.
    """

    def __init__(self, run: Optional[str] = None, *, port: Optional[int] = None, addr: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, registry: Optional[CollectorRegistry] = None,
                 max_window: float = 60.0, detail_every: int = 25, layer_depth: int = 1, max_layers: int = 16,
                 max_eval_series: int = 32, max_config_labels: int = 32, config_allow: Optional[Sequence[str]] = None,
                 config_deny: Optional[Sequence[str]] = None, close_timeout: float = 10.0,
                 web_config: Optional[str] = None, handle_sigterm: bool = True) -> None:
        for name, value in (("detail_every", detail_every), ("max_layers", max_layers),
                            ("max_eval_series", max_eval_series), ("max_config_labels", max_config_labels),
                            ("layer_depth", layer_depth)):
            _check_count("TrainingExporter()", name, value)
        if not _is_number(max_window) or not max_window > 0:
            raise ValueError(f"TrainingExporter(): max_window must be a positive number of seconds, got {max_window!r}")
        if not _is_number(close_timeout) or not 0 <= close_timeout < float("inf"):
            raise ValueError(f"TrainingExporter(): close_timeout must be a number of seconds >= 0, got {close_timeout!r}")
        self.placement = runtime.placement()
        self.run = runtime.resolve_run(run)
        self.rank = self.placement.rank
        port = runtime.resolve_port(port, self.placement.local_rank)
        addr = runtime.resolve_addr(addr)
        config_labels, config_dropped = ConfigLabels(config_allow, config_deny, max_config_labels).labels(config)
        web_config = runtime.resolve_web_config(web_config)
        info = {"world_size": str(self.placement.world_size), "local_rank": str(self.placement.local_rank),
                "host": socket.gethostname(), "version": __version__, **config_labels}

        self._max_eval_series = max_eval_series
        self._last_step_clock: Optional[float] = None
        self._faulted: set = set()
        self._closed = False
        self._warned_closed = False
        self._close_timeout = float(close_timeout)

        self.state = RunState(self.run, self.rank, info, float(max_window), refresh=self._refresh)
        self.state.dropped["config"] += config_dropped
        # Snapshots from the training thread at most once a second, and at least once per bucket of the recent maxima.
        self._totals = DeviceTotals(self.state.merge_steps, period=min(_SNAPSHOT_PERIOD, max_window / _BUCKETS))
        self._steps = StepModel(self.state, self._totals, self._fault, rank=self.rank, detail_every=detail_every,
                                layer_depth=layer_depth, max_layers=max_layers)
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        publisher = Publisher.of(registry)  # exporters sharing a registry serve one family per metric
        publisher.register(self.state)
        self._server: Optional[Endpoint] = serve(registry, port, addr, web_config)
        self.port: int = self._server.port
        self.addr = addr
        log.info("serving metrics of run %r rank %d on %s://%s:%d/metrics", self.run, self.rank, self._server.scheme,
                 addr, self.port)
        self._lifecycle = Lifecycle(self.state, publisher, self.close, handle_sigterm)

    # ----------------------------------------------------------------------------------------------- hooks
    def watch(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
              scaler: Any = None, name: Optional[str] = None) -> None:
        """Publish gradient statistics and learning rates on every ``optimizer.step()``, through hooks.

        Without an optimizer, gradient statistics are taken at ``log_step`` from the model's gradients, so call
        it before ``zero_grad()`` in that case. Pass the ``torch.amp.GradScaler`` when one is used: the steps it
        skips are then counted as skips, not as non-finite gradients. ``name`` prefixes the layer labels of this
        model (default: none for the first model watched, ``model1``, ``model2``, ... for the next ones).
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch(): model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"watch(): optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None and not callable(getattr(scaler, "update", None)):
            raise TypeError(f"watch(): scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if self._closed:
            raise RuntimeError(f"watch() called after close() on the exporter of run {self.run!r}")
        with self.state.lock:
            self._steps.watch(model, optimizer, scaler, name)

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False, foreach: Optional[bool] = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` whose norm (type 2) becomes the coming step's published gradient norm,
        so that the exporter reads no gradient a second time; same arguments and result as torch's
        (see ``exporter.clip.clip_grad_norm_``)."""
        return clip.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, exporter=self)

    def _clipped(self, norm: torch.Tensor) -> None:
        if self._closed:
            return
        try:
            with self.state.lock:
                self._steps.clipped(self._as_tensor(norm))
        except Exception as exc:
            self._fault("hook", exc)

    def _bounded(self, name: str, kind: str) -> str:
        name, cut = bounded(name)
        if cut:
            with self.state.lock:
                self.state.dropped[kind] += 1
        return name

    def _fault(self, where: str, exc: BaseException) -> None:
        if exc is self._lifecycle.forwarded:
            # A signal handler (torchrun's SignalException) raised while the training thread was inside the
            # exporter: that exception is the training loop's, not a fault of ours.
            raise exc
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
        if self._after_close(where):
            return
        not_capturing(where)
        self._lifecycle.stepped()
        try:
            self._log_step(loss, samples, grad_norm, lrs, step)
        except Exception as exc:
            self._fault("log", exc)

    def _log_step(self, loss, samples, grad_norm, lrs, step) -> None:
        now = time.time()
        clock = time.perf_counter()
        with self.state.lock, torch.no_grad():
            st = self.state
            self._totals.before_step(now)
            closed = self._steps.log_step(self._as_tensor(loss), self._as_tensor(grad_norm))
            if step is not None:
                st.step = step
            if closed:
                st.last_step_time = now
                if self._last_step_clock is not None:
                    st.duration_sum += clock - self._last_step_clock
                    st.duration_count += closed
                self._last_step_clock = clock
            if samples is not None:
                st.samples += samples
            for group, value in lrs.items():
                self._steps.publish_lr(group, value)
            self._totals.after_step(now)
            self._apply(self._totals.reader.poll())

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
        if self._after_close(where):
            return
        split = self._bounded(split, "eval")
        metrics = {self._bounded(name, "eval"): value for name, value in (metrics or {}).items()}
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
        scrapes the final state and no hung or target-down alert fires for a finished run: at exit, the process
        waits up to ``close_timeout`` seconds for that scrape (not at all when it already happened). A new
        exporter on the same port takes the port over and serves this run's final series until scraped once.
        """
        if status not in _STATUSES:
            raise ValueError(f"close(): status must be one of {', '.join(_STATUSES)}, got {status!r}")
        if not self._closed:
            self._closed = True
            self._lifecycle.close()
            with self.state.lock:
                self._steps.remove()
                self._steps.finish()
                # A snapshot still in flight would make the last one wait for the next: land it first.
                self._apply(self._totals.reader.flush())
                self._totals.snapshot(time.time())
                self._apply(self._totals.reader.flush())
                self.state.status = status
            if self._server is not None:
                self._server.close(self._close_timeout)
        if stop_server and self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "TrainingExporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(self._lifecycle.exit_status(exc_type, exc))

    # ------------------------------------------------------------------------------------------- internals
    def _after_close(self, where: str) -> bool:
        """True after close(): the call is a no-op, warned about once (a signal handler may close the exporter
        while the loop still runs; that must not crash training)."""
        if self._closed and not self._warned_closed:
            self._warned_closed = True
            log.warning("training exporter: %s called after close() on run %r is ignored (warned once)", where,
                        self.run)
        return self._closed

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
            if hasattr(value, "to_local"):  # a replicated DTensor, as clip_grad_norm_ returns under FSDP2
                value = value.to_local()
            return value if value.dim() == 0 else value.reshape(())  # read under no_grad: no detach op
        return torch.tensor(float(value), dtype=torch.float64)

    def _set_value(self, value: Any, setter) -> None:
        """Publish a number now, a tensor once its asynchronous copy has completed. Call with the lock held."""
        if isinstance(value, torch.Tensor):
            self._totals.reader.submit(value.reshape(()), lambda v: setter(float(v)))
        else:
            setter(float(value))

    def _apply(self, ready) -> None:
        for callback, values in ready:
            try:
                callback(values)
            except Exception as exc:
                self._fault("reader", exc)

    def _refresh(self) -> None:
        """At each scrape: publish what the device has finished, even while the training thread is elsewhere (a
        long evaluation, a checkpoint, a hang). Waiting for a device copy happens here, off the training thread
        and without the lock."""
        try:
            deadline = time.monotonic() + _SCRAPE_WAIT
            # Two rounds: the first lands a snapshot the training thread left in flight, the second takes and lands
            # what waited behind it.
            for _ in range(2):
                with self.state.lock:
                    self._apply(self._totals.reader.poll())
                    self._totals.snapshot(time.time())
                    waiting = self._totals.reader.pending_events()
                if not waiting:
                    break
                while any(not e.query() for e in waiting) and time.monotonic() < deadline:
                    time.sleep(0.005)
            with self.state.lock:
                self._apply(self._totals.reader.poll())
        except Exception as exc:
            self._fault("collect", exc)

    # ------------------------------------------------------------------------------------------- lifecycle
    def phase(self, name: str) -> Union[PhaseBlock, ContextManager[None]]:
        """Mark what the loop does now ("eval", "checkpoint", ...): each phase has its own allowance in the
        rules before the run counts as hung. Use ``with exp.phase("checkpoint"):`` to return to the phase
        before at the end of the block; without ``with``, the phase lasts until the next ``phase()`` call.
        A run is in "startup" until its first ``log_step`` and in "train" after it.
        """
        if self._after_close("phase()"):
            # Like log_step: a signal handler may close the exporter while the loop still runs.
            return contextlib.nullcontext()
        return self._lifecycle.phase(name)
