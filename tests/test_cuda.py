"""GPU checks: no hidden host synchronisation in the training thread, pinned copy targets.

They need a CUDA device and are skipped without one (the CPU machines of CI have none).
"""
import math

import pytest
import torch
from torch import nn

from exporter import TrainingExporter
from exporter.device_stats import AsyncReader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_thread_never_synchronises(registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = TrainingExporter(run="cuda", port=0, addr="127.0.0.1", registry=registry, detail_every=2)
    exp.watch(model, optimizer)
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")

    def step():
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        exp.log_step(loss=loss, samples=32)
        exp.log_eval("val", loss=loss.detach(), metrics={"mse": loss.detach()})
        return loss.detach()

    losses = [step()]  # first step: lazy initialisation, accumulators, index tensors
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            losses.append(step())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    exp.close(stop_server=True)
    labels = {"run": "cuda", "rank": "0"}
    assert registry.get_sample_value("training_step_loss_count", labels) == 11
    total = float(torch.stack(losses).double().sum())
    assert math.isclose(registry.get_sample_value("training_step_loss_sum", labels), total, rel_tol=1e-6)
    assert registry.get_sample_value("training_loss", dict(labels, split="val")) == pytest.approx(float(losses[-1]))


def test_copies_land_in_pinned_memory():
    reader = AsyncReader()
    reader.submit(torch.ones(4, device="cuda"), lambda values: None)
    _, host, _ = reader._pending[0]
    assert host.is_pinned()
    assert [list(v) for _, v in reader.flush()] == [[1.0, 1.0, 1.0, 1.0]]
