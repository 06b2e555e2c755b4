"""A real small training run instrumented with the exporter, healthy or with one injected pathology.

The model is a small MLP that learns a fixed random teacher network from synthetic data on the CPU. Each
scenario is the healthy run with one thing changed, the way the pathology happens in real jobs: a fixed small
noisy training set (overfitting), a bad batch (spike), a loss-scaling bug (gradient explosion), a sign bug
(divergence), a NaN in the data, a scheduler that drops the learning rate to zero (plateau), a stuck data
loader (hang), a dying process (crash).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..core import TrainingExporter


@dataclass(frozen=True)
class Scenario:
    """How a demo run differs from the healthy one."""

    description: str
    fault: Optional[str] = None  # what happens from step `fault_at` (a fraction of the run) on
    fault_at: float = 0.3
    train_size: Optional[int] = None  # a fixed training set of this size instead of fresh batches
    label_noise: float = 0.05
    batch_size: int = 64
    lr: float = 2e-3
    schedule: str = "constant"  # constant | warmup_cosine | step_decay
    clip: Optional[float] = None  # clip the gradient norm to this, publishing the norm before clipping


SCENARIOS = {
    "healthy": Scenario("fresh batches, Adam, constant learning rate: both losses fall"),
    "noisy": Scenario("healthy with small batches and noisy labels", batch_size=4, label_noise=0.5),
    "cosine": Scenario("healthy with linear warmup and cosine decay of the learning rate", schedule="warmup_cosine",
                       lr=4e-3),
    "stepdecay": Scenario("healthy with the learning rate divided by 10 at 50% and 80% of the run",
                          schedule="step_decay", lr=4e-3),
    "overfit": Scenario("a fixed training set of 1024 noisy samples: train loss falls, val loss rises",
                        train_size=1024, batch_size=32, label_noise=1.0, lr=1e-3, schedule="warmup_cosine"),
    "spike": Scenario("one bad batch (inputs scaled x30)", fault="spike"),
    "explode": Scenario("a loss-scaling bug grows the gradients to 1e4x over 200 steps; clipping keeps the "
                        "loss stable and the pre-clip norm is published", fault="explode", clip=0.5),
    "diverge": Scenario("a sign bug: gradient ascent makes the loss climb", fault="diverge"),
    "nan": Scenario("a NaN in one input batch poisons the weights", fault="nan"),
    "plateau": Scenario("the learning rate drops to zero early: both losses stop improving", fault="plateau",
                        fault_at=0.05),
    "hang": Scenario("the data loader blocks forever: no more steps", fault="hang"),
    "crash": Scenario("the process dies without closing the exporter", fault="crash"),
}

DIM = 16


def _teacher(generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    w1 = torch.randn(DIM, 32, generator=generator) / math.sqrt(DIM)
    w2 = torch.randn(32, 1, generator=generator) / math.sqrt(32)
    return lambda x: torch.tanh(x @ w1) @ w2


def _lr_factor(schedule: str, step: int, steps: int) -> float:
    if schedule == "warmup_cosine":
        warmup = max(1, steps // 10)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    if schedule == "step_decay":
        return 0.1 ** ((step >= steps * 0.5) + (step >= steps * 0.8))
    return 1.0


def train(exp: TrainingExporter, scenario: Scenario, *, steps: int, step_time: float = 0.0, eval_every: int = 50,
          steps_per_epoch: int = 200, seed: int = 0, progress: Optional[Callable[[str], None]] = print,
          progress_every: float = 5.0) -> None:
    """Train for ``steps`` optimizer steps, each taking at least ``step_time`` seconds, publishing to ``exp``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = _teacher(gen)

    def sample(n: int):
        x = torch.randn(n, DIM, generator=gen)
        return x, teacher(x) + scenario.label_noise * torch.randn(n, 1, generator=gen)

    x_val, y_val = sample(512)
    fixed = sample(scenario.train_size) if scenario.train_size else None
    model = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=scenario.lr)
    exp.watch(model, optimizer)
    loss_fn = nn.MSELoss()
    fault_step = int(steps * scenario.fault_at)
    started = last_report = time.monotonic()

    for step in range(steps):
        tick = time.monotonic()
        exp.set_epoch(step // steps_per_epoch)
        if fixed is not None:
            idx = torch.randint(0, scenario.train_size, (min(scenario.batch_size, scenario.train_size),),
                                generator=gen)
            x, y = fixed[0][idx], fixed[1][idx]
        else:
            x, y = sample(scenario.batch_size)
        fault = scenario.fault if step >= fault_step else None
        if fault and step == fault_step:
            # The end-to-end tests measure detection delay from this line.
            _report(progress, f"step {step}: fault {fault!r} injected at unix time {time.time():.3f}")
        if fault == "hang":
            while True:  # a data loader that never returns
                time.sleep(3600)
        if fault == "crash":
            sys.stdout.flush()
            os._exit(3)
        if fault == "spike" and step == fault_step:
            x = x * 30
        if fault == "nan" and step == fault_step:
            x = x.clone()
            x[0, 0] = float("nan")
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if fault == "plateau" else scenario.lr * _lr_factor(scenario.schedule, step, steps)

        loss = loss_fn(model(x), y)
        objective = loss
        if fault == "diverge":
            objective = -loss
        elif fault == "explode":
            objective = loss * 10 ** (4 * min(1.0, (step - fault_step) / 200))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        pre_clip = nn.utils.clip_grad_norm_(model.parameters(), scenario.clip) if scenario.clip else None
        optimizer.step()
        exp.log_step(loss=loss, samples=len(x), grad_norm=pre_clip)

        if (step + 1) % eval_every == 0:
            with torch.no_grad():
                pred = model(x_val)
                val = loss_fn(pred, y_val)
                exp.log_eval("val", loss=val, metrics={"mse": val, "mae": (pred - y_val).abs().mean()})
        now = time.monotonic()
        if progress is not None and now - last_report >= progress_every:
            last_report = now
            st = exp.state
            _report(progress, f"step {step + 1}/{steps}  train loss {st.losses.get('train', float('nan')):.4g}  "
                              f"val loss {st.losses.get('val', float('nan')):.4g}  "
                              f"{(step + 1) / (now - started):.1f} steps/s")
        if step_time > 0:
            time.sleep(max(0.0, step_time - (time.monotonic() - tick)))


def _report(progress: Optional[Callable[[str], None]], line: str) -> None:
    if progress is not None:
        progress(line)


def main(scenario: str = "healthy", *, steps: int = 1200, step_time: float = 0.05, eval_every: int = 50,
         run: Optional[str] = None, port: Optional[int] = None, addr: Optional[str] = None,
         linger: float = 0.0, max_window: float = 60.0) -> int:
    """Run one demo training and keep serving ``linger`` seconds after it ended so a scrape sees the end."""
    spec = SCENARIOS[scenario]
    run = run or f"demo-{scenario}"
    config = {"scenario": scenario, "lr": spec.lr, "batch_size": spec.batch_size, "schedule": spec.schedule}
    with TrainingExporter(run=run, port=port, addr=addr, config=config, max_window=max_window) as exp:
        print(f"run {run!r} ({spec.description}): {steps} steps, metrics on http://{_host(exp.addr)}:{exp.port}/metrics",
              flush=True)
        train(exp, spec, steps=steps, step_time=step_time, eval_every=eval_every,
              progress=lambda line: print(line, flush=True))
    print(f"run {run!r} completed at step {exp.state.step}", flush=True)
    if linger > 0:
        time.sleep(linger)
    return 0


def _host(addr: str) -> str:
    return "localhost" if addr in ("0.0.0.0", "::", "") else addr
