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


# ---------------------------------------------------------------------- loop and model shapes on the GPU
# The training code of these rows synchronises by itself (a scaler's skip decision, a mixed-device backward), so
# the sync check covers exactly the exporter: its optimizer hooks (a probe hook registered before them turns the
# check on, one registered after turns it off), the scaler's update and log_step.

def _probe(optimizer):
    """Optimizer hooks around the exporter's: the exporter's hooks run with the sync check on."""
    optimizer.register_step_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
    return lambda: optimizer.register_step_post_hook(lambda *_: torch.cuda.set_sync_debug_mode(0))


class _SyncChecked:
    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)


def _norm64(params):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))


def test_amp_with_scaler_skips_counted_without_synchronising(registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    after = _probe(optimizer)
    exp = TrainingExporter(run="cuda", port=0, addr="127.0.0.1", registry=registry)
    exp.watch(model, optimizer, scaler=scaler)
    after()
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")
    norms, skipped = [], 0
    for i in range(30):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if i % 10 == 5:
            model[2].weight.grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)
        norm = _norm64(model.parameters())
        if math.isfinite(norm):
            norms.append(norm)
        else:
            skipped += 1
        scaler.step(optimizer)
        with _SyncChecked():
            scaler.update()
            exp.log_step(loss=loss.detach(), samples=32)
    exp.close(stop_server=True)
    labels = {"run": "cuda", "rank": "0"}
    assert registry.get_sample_value("training_scaler_skipped_steps_total", labels) == skipped == 3
    assert registry.get_sample_value("training_grad_nonfinite_total", labels) == 0
    assert registry.get_sample_value("training_step", labels) == 30
    assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(norms[-1], rel=1e-4)
    print(f"\nAMP on {torch.cuda.get_device_name()}: norm {registry.get_sample_value('training_grad_norm', labels):.6f}"
          f" / {norms[-1]:.6f}, skipped {skipped}")


class _TwoDevices(nn.Module):
    """An embedding-like first layer on the CPU, the rest on the GPU."""

    def __init__(self):
        super().__init__()
        self.cpu_part = nn.Linear(16, 64)
        self.gpu_part = nn.Sequential(nn.ReLU(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 4)).cuda()

    def forward(self, x):
        return self.gpu_part(self.cpu_part(x).pin_memory().to("cuda", non_blocking=True))


def test_mixed_device_norm_combines_parts_after_their_copies_landed(registry):
    torch.manual_seed(0)
    model = _TwoDevices()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    after = _probe(optimizer)
    exp = TrainingExporter(run="cuda", port=0, addr="127.0.0.1", registry=registry)
    exp.watch(model, optimizer)
    after()
    norms = []
    for _ in range(10):
        x = torch.randn(64, 16)
        loss = model(x).square().sum() * 100  # large GPU-side gradients: a part read before landing shows
        optimizer.zero_grad()
        loss.backward()
        norms.append(_norm64(model.parameters()))
        optimizer.step()
        with _SyncChecked():
            exp.log_step(loss=loss.detach())
    exp.close(stop_server=True)
    labels = {"run": "cuda", "rank": "0"}
    assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(norms[-1], rel=1e-4)
    assert registry.get_sample_value("training_grad_norm_sum_total", labels) == pytest.approx(sum(norms), rel=1e-4)
    published = registry.get_sample_value("training_grad_norm", labels)
    print(f"\nmixed CPU+{torch.cuda.get_device_name()}: norm {published:.4f} / {norms[-1]:.4f}")


def test_moe_on_the_gpu_builds_no_index_from_the_host(registry):
    import random

    torch.manual_seed(0)
    rng = random.Random(0)
    experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(16)).cuda()
    head = nn.Linear(32, 2).cuda()
    model = nn.ModuleDict({"experts": experts, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    after = _probe(optimizer)
    exp = TrainingExporter(run="cuda", port=0, addr="127.0.0.1", registry=registry, layer_depth=2, max_layers=32)
    exp.watch(model, optimizer)
    after()
    x = torch.randn(64, 32, device="cuda")
    norms = []
    for step in range(2000):
        chosen = rng.sample(range(16), 2)  # routing decided on the host: the model itself never syncs
        loss = head(sum(experts[i](x) for i in chosen)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 1999:
            norms.append(_norm64(model.parameters()))
        optimizer.step()
        with _SyncChecked():
            exp.log_step(loss=loss.detach())
    exp.close(stop_server=True)
    labels = {"run": "cuda", "rank": "0"}
    assert len(exp._steps.watched[0].stats.layouts) == 1
    assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(norms[-1], rel=1e-4)
    print(f"\nMoE on {torch.cuda.get_device_name()}: 2000 steps, grouping cache entries "
          f"{len(exp._steps.watched[0].stats.layouts)}")


# ---------------------------------------------------------------------- host cost: fused clip, CUDA graphs

def test_fused_clip_and_per_layer_norms_never_synchronise(registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    exp = TrainingExporter(run="cuda", port=0, addr="127.0.0.1", registry=registry, detail_every=3)
    exp.watch(model, optimizer)
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")
    norms = []

    def step():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norms.append(exp.clip_grad_norm_(model.parameters(), 0.5))
        optimizer.step()
        optimizer.zero_grad()
        exp.log_step(loss=loss)

    step()
    with _SyncChecked():
        for _ in range(300):  # more than a ring holds: folds on the device too
            step()
    exp.close(stop_server=True)
    labels = {"run": "cuda", "rank": "0"}
    assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(float(norms[-1]), rel=1e-6)
    total = float(torch.stack(norms).double().sum())
    assert registry.get_sample_value("training_grad_norm_sum_total", labels) == pytest.approx(total, rel=1e-6)
    assert registry.get_sample_value("training_layer_grad_norm", dict(labels, layer="0")) > 0


def _graphed_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    return model, optimizer, step


def test_cuda_graph_replays_are_read_after_replay(registry):
    model, _, step = _graphed_step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    exp = TrainingExporter(run="graph", port=0, addr="127.0.0.1", registry=registry)
    exp.watch(model)  # no optimizer: its hooks would run only at capture
    for _ in range(4):
        graph.replay()
        exp.log_step(loss=loss)
    exp.close(stop_server=True)
    labels = {"run": "graph", "rank": "0"}
    assert registry.get_sample_value("training_step", labels) == 4
    assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(_norm64(model.parameters()),
                                                                                    rel=1e-5)


def test_optimizer_hooks_refuse_a_cuda_graph_capture(registry):
    model, optimizer, step = _graphed_step()
    exp = TrainingExporter(run="graph", port=0, addr="127.0.0.1", registry=registry)
    exp.watch(model, optimizer)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step()
    exp.close(stop_server=True)
