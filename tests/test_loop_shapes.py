"""The loop-shape matrix: each row a real short CPU training run in one of the loop shapes real code uses.

Each row checks what the exporter published against a float64 reference computed by the loop itself: the step,
the mean loss, the last and the mean gradient norm, the non-finite and skipped counts. Its scrapes, replayed in
promtool one minute apart (two hours), raise no alert; the same run with one NaN loss fires
TrainingLossNotFinite. Run with ``-s`` to see the matrix rows.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from exporter import TrainingExporter
from promtool import alerts_fired, process_series, write_and_run

STEPS = 240  # optimizer steps per row
SCRAPE_EVERY = 2  # loop iterations between two scrapes: 120 scrapes, replayed one minute apart
NAN_AT = 149  # a logging iteration of every row, interval logging's included
LABELS = {"job": "training", "instance": "node-1:9945", "rank": "0"}


def model_of(width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))


TARGET = torch.Generator().manual_seed(1)
W_TRUE = torch.randn(8, 2, generator=TARGET)


def batch(n: int = 16):
    x = torch.randn(n, 8)
    return x, x @ W_TRUE + 0.3 * torch.randn(n, 2)


def norm64(params) -> float:
    """The float64 reference of the global gradient norm of ``params``."""
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))


@dataclass
class Ref:
    """What the loop knows in float64: one entry per optimizer step."""

    steps: int = 0
    losses: List[float] = field(default_factory=list)  # the loss of each optimizer step with a finite one
    norms: List[float] = field(default_factory=list)  # the norm of each optimizer step taken
    loss_nonfinite: int = 0
    skipped: int = 0


@dataclass
class Row:
    """A run: the exporter, its registry, the reference and the scrapes taken along the way."""

    name: str
    nan_at: Optional[int]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    ref: Ref = field(default_factory=Ref)
    scrapes: List[Dict[str, float]] = field(default_factory=list)
    exp: TrainingExporter = None

    def __post_init__(self):
        # The scrapes are replayed a minute apart, but the run takes a second or two: a windowed maximum of
        # real seconds would hold the run's first (largest) losses in every replayed scrape, a spike that never
        # happened. A window of a millisecond keeps about the steps since the previous scrape, as a minute would.
        self.exp = TrainingExporter(run=self.name, port=0, addr="127.0.0.1", registry=self.registry,
                                    max_window=0.001)

    def logged(self, i: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss the loop logs at iteration ``i``: NaN once in the injected variant."""
        return loss.detach() * float("nan") if i == self.nan_at else loss.detach()

    def scrape(self) -> None:
        sample = {}
        for family in self.registry.collect():  # a real collection, as a scrape runs it
            for s in family.samples:
                if s.name.startswith("training_") and s.name != "training_run_info":
                    extra = {k: v for k, v in s.labels.items() if k not in ("run", "rank")}
                    key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}"
                                    if extra else "")
                    sample[key] = s.value
        self.scrapes.append(sample)

    def value(self, name: str, **labels) -> Optional[float]:
        return self.registry.get_sample_value(name, {"run": self.name, "rank": "0", **labels})

    def series(self) -> Dict[str, list]:
        keys = sorted({k for s in self.scrapes for k in s})
        out = {k: [s.get(k) for s in self.scrapes] for k in keys}
        # Replayed one scrape a minute: the step's wall clock becomes the replay's.
        out["training_last_step_timestamp_seconds"] = [minute * 60.0 if s.get("training_step") else None
                                                       for minute, s in enumerate(self.scrapes)]
        out["training_run_start_timestamp_seconds"] = [0.0] * len(self.scrapes)
        out["training_last_progress_timestamp_seconds"] = [
            minute * 60.0 if s.get("training_step") else 0.0 for minute, s in enumerate(self.scrapes)]
        if "training_last_nonfinite_timestamp_seconds" in out:
            first = next(m for m, v in enumerate(out["training_last_nonfinite_timestamp_seconds"]) if v is not None)
            out["training_last_nonfinite_timestamp_seconds"] = [
                None if m < first else first * 60.0 for m in range(len(self.scrapes))]
        out.update({k: v for k, v in process_series(len(self.scrapes)).items() if k not in out or k == "up"})
        return out


# ------------------------------------------------------------------------------------------------ the loops
def plain(row: Row, clip: bool = False, autocast: bool = False) -> None:
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    row.exp.watch(model, optimizer)
    for i in range(STEPS):
        x, y = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.mse_loss(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        norm = norm64(model.parameters())
        pre_clip = nn.utils.clip_grad_norm_(model.parameters(), 1.0) if clip else None
        optimizer.step()
        row.exp.log_step(loss=row.logged(i, loss), samples=len(x), grad_norm=pre_clip)
        row.ref.steps += 1
        row.ref.norms.append(norm)
        _ref_loss(row, i, float(loss.detach()))
        if i % SCRAPE_EVERY == SCRAPE_EVERY - 1:
            row.scrape()


def _ref_loss(row: Row, i: int, loss: float, weight: int = 1) -> None:
    if i == row.nan_at:
        row.ref.loss_nonfinite += 1
    else:
        row.ref.losses.extend([loss] * weight)


def scaler_overflows(row: Row) -> None:
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=50)
    row.exp.watch(model, optimizer, scaler=scaler)
    for i in range(STEPS):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if i % 40 == 7:  # an fp16 overflow, as a scaler meets it now and then
            model[2].weight.grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)
        norm = norm64(model.parameters())
        scaler.step(optimizer)
        scaler.update()
        row.exp.log_step(loss=row.logged(i, loss), samples=len(x))
        row.ref.steps += 1
        if math.isfinite(norm):
            row.ref.norms.append(norm)
        else:
            row.ref.skipped += 1
        _ref_loss(row, i, float(loss.detach()))
        if i % SCRAPE_EVERY == SCRAPE_EVERY - 1:
            row.scrape()


def accumulation(row: Row, per_micro_batch: bool, micro: int = 4) -> None:
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    row.exp.watch(model, optimizer)
    for i in range(STEPS):
        optimizer.zero_grad()
        losses = []
        for m in range(micro):
            x, y = batch(4)
            loss = nn.functional.mse_loss(model(x), y)
            (loss / micro).backward()
            losses.append(loss.detach())
            if m == micro - 1:
                row.ref.norms.append(norm64(model.parameters()))
                optimizer.step()
            if per_micro_batch:  # the last micro-batch's log_step comes after its optimizer step
                row.exp.log_step(loss=row.logged(i, loss) if m == 1 else loss.detach(), samples=len(x))
        if not per_micro_batch:
            row.exp.log_step(loss=row.logged(i, torch.stack(losses).mean()), samples=4 * micro)
        row.ref.steps += 1
        if i == row.nan_at:
            row.ref.loss_nonfinite += 1
            if per_micro_batch:  # the step's mean is that of its finite micro-batches
                row.ref.losses.append(float(torch.stack(losses[:1] + losses[2:]).double().mean()))
        else:
            row.ref.losses.append(float(torch.stack(losses).double().mean()))
        if i % SCRAPE_EVERY == SCRAPE_EVERY - 1:
            row.scrape()


def interval(row: Row, every: int = 10) -> None:
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    row.exp.watch(model, optimizer)
    window = []
    for i in range(STEPS):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        row.ref.norms.append(norm64(model.parameters()))
        optimizer.step()
        row.ref.steps += 1
        window.append(loss.detach())
        if len(window) == every:
            mean = torch.stack(window).mean()
            row.exp.log_step(loss=row.logged(i, mean), samples=every * len(x))
            _ref_loss(row, i, float(mean), weight=every)
            window = []
        if i % SCRAPE_EVERY == SCRAPE_EVERY - 1:
            row.scrape()


def two_optimizers(row: Row) -> None:
    a, b = model_of(seed=0), model_of(seed=1)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.02), torch.optim.SGD(b.parameters(), lr=0.01)
    row.exp.watch(a, opt_a)
    row.exp.watch(b, opt_b)
    for i in range(STEPS):
        x, y = batch()
        loss_a = nn.functional.mse_loss(a(x), y)
        opt_a.zero_grad()
        loss_a.backward()
        norm_a = norm64(a.parameters())
        opt_a.step()
        loss_b = nn.functional.mse_loss(b(x), y)
        opt_b.zero_grad()
        loss_b.backward()
        row.ref.norms.append(math.hypot(norm_a, norm64(b.parameters())))
        opt_b.step()
        loss = loss_a.detach() + loss_b.detach()
        row.exp.log_step(loss=row.logged(i, loss), samples=len(x))
        row.ref.steps += 1
        _ref_loss(row, i, float(loss.detach()))
        if i % SCRAPE_EVERY == SCRAPE_EVERY - 1:
            row.scrape()


def skips_nonfinite(row: Row) -> None:
    """A loop that checks its loss and skips the update for a non-finite one (so the NaN never reaches the model)."""
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    row.exp.watch(model, optimizer)
    for i in range(STEPS):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        if i == row.nan_at:
            loss = loss * float("nan")
        optimizer.zero_grad()
        if not torch.isfinite(loss):  # the loop's own check
            row.exp.log_step(loss=loss.detach(), samples=len(x))
            row.ref.loss_nonfinite += 1
        else:
            loss.backward()
            row.ref.norms.append(norm64(model.parameters()))
            optimizer.step()
            row.exp.log_step(loss=loss.detach(), samples=len(x))
            row.ref.steps += 1
            row.ref.losses.append(float(loss.detach()))
        if i % SCRAPE_EVERY == SCRAPE_EVERY - 1:
            row.scrape()


ROWS: Dict[str, Callable[[Row], None]] = {
    "plain": plain,
    "clip": lambda row: plain(row, clip=True),
    "scaler": scaler_overflows,
    "bf16-autocast": lambda row: plain(row, autocast=True),
    "accum-per-micro": lambda row: accumulation(row, per_micro_batch=True),
    "accum-per-step": lambda row: accumulation(row, per_micro_batch=False),
    "interval-10": interval,
    "two-optimizers": two_optimizers,
    "skips-nonfinite": skips_nonfinite,
}


def run(name: str, nan_at: Optional[int] = None) -> Row:
    row = Row(f"shape-{name}" + ("-nan" if nan_at is not None else ""), nan_at)
    try:
        ROWS[name](row)
        row.exp.close()
    finally:
        row.exp.close(stop_server=True)
    return row


def check(row: Row, rel: float = 1e-5) -> str:
    """Assert the published values equal the reference; returns the matrix line."""
    ref, value = row.ref, row.value
    steps = value("training_loss_steps_total")
    mean = (value("training_loss_positive_sum_total") - value("training_loss_negative_sum_total")) / steps
    ref_mean = math.fsum(ref.losses) / len(ref.losses)
    norm_mean = value("training_grad_norm_sum_total") / value("training_grad_norm_steps_total")
    ref_norm_mean = math.fsum(ref.norms) / len(ref.norms)
    got = {"step": value("training_step"), "loss steps": steps, "norm steps": value("training_grad_norm_steps_total"),
           "loss nonfinite": value("training_loss_nonfinite_total"),
           "grad nonfinite": value("training_grad_nonfinite_total"),
           "skipped": value("training_scaler_skipped_steps_total")}
    want = {"step": ref.steps, "loss steps": len(ref.losses), "norm steps": len(ref.norms),
            "loss nonfinite": ref.loss_nonfinite, "grad nonfinite": 0, "skipped": ref.skipped}
    assert got == want
    assert mean == pytest.approx(ref_mean, rel=rel)
    assert norm_mean == pytest.approx(ref_norm_mean, rel=rel)
    assert value("training_grad_norm") == pytest.approx(ref.norms[-1], rel=rel)
    return (f"| {row.name} | {got['step']:.0f} / {ref.steps} | {mean:.6f} / {ref_mean:.6f} | "
            f"{value('training_grad_norm'):.6f} / {ref.norms[-1]:.6f} | {norm_mean:.6f} / {ref_norm_mean:.6f} | "
            f"{got['loss nonfinite']:.0f}+{got['grad nonfinite']:.0f} / {ref.loss_nonfinite}+0 | "
            f"{got['skipped']:.0f} / {ref.skipped} |")


def replay(tmp_path, rows: List[Row]) -> Dict[str, List[str]]:
    """The alerts each run fires over its scrapes replayed one minute apart: all runs in one promtool test."""
    minutes = len(rows[0].scrapes) - 1
    series: Dict[str, list] = {}
    for row in rows:
        assert len(row.scrapes) == minutes + 1
        for key, values in row.series().items():
            name, _, inner = key.partition("{")
            series[name + '{run="' + row.name + '"' + ("," + inner if inner else "}")] = values
    fired = alerts_fired(tmp_path, "loop-shapes", series, LABELS, minutes)
    return {row.name: sorted(a["alertname"] for a in fired if a.get("run") == row.name) for row in rows}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every row, clean and with one NaN loss, and the alerts of their replays."""
    clean = {name: run(name) for name in ROWS}
    nan = {name: run(name, nan_at=NAN_AT) for name in ROWS}
    fired = replay(tmp_path_factory.mktemp("clean"), list(clean.values()))
    fired.update(replay(tmp_path_factory.mktemp("nan"), list(nan.values())))
    return clean, nan, fired


@pytest.mark.parametrize("name", list(ROWS))
def test_loop_shape(matrix, name):
    clean, nan, fired = matrix
    line = check(clean[name])
    assert fired[clean[name].name] == []
    assert nan[name].value("training_loss_nonfinite_total") == 1
    assert fired[nan[name].name] == ["TrainingLossNotFinite"]
    print(f"\n{line} none | {', '.join(fired[nan[name].name])} |")


# ------------------------------------------------------------------------------ model shapes (issue 9 rows)
SCRIPT = Path(__file__).resolve().parent / "loop_shapes_dist.py"


def torchrun(mode: str, out: Path) -> List[dict]:
    """Two ranks of ``loop_shapes_dist.py`` under torchrun (gloo, CPU); returns their results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parent.parent))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(SCRIPT), mode, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads((out / f"{rank}.json").read_text()) for rank in (0, 1)]


def matrix_line(row: str, published: float, reference: float, note: str = "") -> str:
    return f"| {row} | {published:.6f} | {reference:.6f} | {note} |"


def test_fsdp2_two_ranks_publish_shard_shares_that_sum_to_the_global_norm(tmp_path):
    ranks = torchrun("fsdp2", tmp_path)
    global_norms = [math.sqrt(a + b) for a, b in zip(ranks[0]["ref_sq"], ranks[1]["ref_sq"])]
    # The float64 reference agrees with the loop's own collective clip_grad_norm_.
    assert global_norms == pytest.approx(ranks[0]["clip_norms"], rel=1e-5)
    for r in ranks:
        clip, local, flat = r["clip"], r["local"], r["flat"]
        for published in (clip, local, flat):
            assert published["training_step"] == 20 and published["errors"] == 0
            assert published["training_grad_nonfinite_total"] == 0
        assert clip["training_grad_norm"] == pytest.approx(global_norms[-1], rel=1e-5)
        assert clip["training_grad_norm_sum_total"] == pytest.approx(sum(global_norms), rel=1e-5)
        # Without the clipping norm: the rank-local norm of its shard, and its share of the global sum.
        assert local["training_grad_norm"] == pytest.approx(math.sqrt(r["ref_sq"][-1]), rel=1e-5)
        assert local["training_grad_norm_shard_squared"] == pytest.approx(r["ref_sq"][-1], rel=1e-5)
        assert local["layers"] == ["0", "2", "4"] and flat["layers"] == []
    shares = [r["local"]["training_grad_norm_shard_squared"] for r in ranks]
    assert math.sqrt(sum(shares)) == pytest.approx(global_norms[-1], rel=1e-5)
    # The recording rule computes the run's global norm from the ranks' shares.
    test = {"interval": "1m", "input_series": [
        {"series": f'training_grad_norm_shard_squared{{job="training",run="fsdp",rank="{r}"}}',
         "values": f"{shares[r]!r}x5"} for r in (0, 1)],
        "promql_expr_test": [{"expr": 'run:training_grad_norm:global{run="fsdp"}', "eval_time": "2m",
                              "exp_samples": [{"labels": 'run:training_grad_norm:global{job="training",run="fsdp"}',
                                               "value": math.sqrt(sum(shares))}]}]}
    result = write_and_run(tmp_path, [test])
    assert result.returncode == 0, result.stdout + result.stderr
    print("\n" + matrix_line("fsdp2 x2, clip norm passed", ranks[0]["clip"]["training_grad_norm"], global_norms[-1]))
    print(matrix_line("fsdp2 x2, run:training_grad_norm:global", math.sqrt(sum(shares)), global_norms[-1]))


def test_ddp_two_ranks_publish_the_global_norm_with_the_users_layer_names(tmp_path):
    ranks = torchrun("ddp", tmp_path)
    for r in ranks:
        local = r["local"]
        norms = [math.sqrt(sq) for sq in r["ref_sq"]]  # DDP's gradients are all-reduced: a rank's are global
        assert norms == pytest.approx(r["clip_norms"], rel=1e-5)
        assert local["training_grad_norm"] == pytest.approx(norms[-1], rel=1e-5)
        assert local["training_grad_norm_sum_total"] == pytest.approx(sum(norms), rel=1e-5)
        assert local["training_grad_norm_shard_squared"] is None
        assert local["layers"] == ["0", "2", "4"]  # not DDP's "module"
        assert local["errors"] == 0 and r["flat"]["training_step"] == 20
    print("\n" + matrix_line("ddp x2", ranks[0]["local"]["training_grad_norm"], math.sqrt(ranks[0]["ref_sq"][-1])))


def _train(exp, model, optimizer, steps, make_batch, before_step=None):
    """Real SGD steps; returns the float64 reference norm of every step."""
    norms = []
    for i in range(steps):
        x, y = make_batch()
        loss = nn.functional.mse_loss(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step(i)
        norms.append(norm64(model.parameters()))
        optimizer.step()
        exp.log_step(loss=loss.detach())
    return norms


def _exporter(name, **kwargs):
    registry = CollectorRegistry()
    return TrainingExporter(run=name, port=0, addr="127.0.0.1", registry=registry, **kwargs), registry


def _layers(registry):
    return sorted(s.labels["layer"] for m in registry.collect() if m.name == "training_layer_grad_norm"
                  for s in m.samples)


def test_compiled_model_keeps_the_users_layer_names():
    model = model_of()
    compiled = torch.compile(model, backend="eager")  # the OptimizedModule wrapper; eager keeps the test fast
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.02)
    exp, registry = _exporter("compile")
    try:
        exp.watch(compiled, optimizer)
        norms = _train(exp, compiled, optimizer, 20, batch)
        exp.close()
        labels = {"run": "compile", "rank": "0"}
        assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(norms[-1], rel=1e-5)
        assert _layers(registry) == ["0", "2", "4"]  # not "_orig_mod"
    finally:
        exp.close(stop_server=True)
    print("\n" + matrix_line("torch.compile", registry.get_sample_value("training_grad_norm", labels), norms[-1]))


class MoE(nn.Module):
    """Top-2 of 16 experts per batch: most experts get no gradient at a given step."""

    def __init__(self, experts: int = 16, width: int = 8):
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        top = self.router(x).mean(0).topk(2).indices.tolist()  # a host read in the model, not in the exporter
        return self.head(sum(self.experts[i](x) for i in top))


def test_moe_with_unused_experts_keeps_one_grouping_per_device():
    torch.manual_seed(0)
    model = MoE()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exp, registry = _exporter("moe", layer_depth=2, max_layers=32)
    try:
        exp.watch(model, optimizer)
        norms = _train(exp, model, optimizer, 2000, batch)
        exp.close()
        stats = exp._steps.watched[0].stats
        labels = {"run": "moe", "rank": "0"}
        assert len(stats.layouts) == 1  # one device, one width: whatever the sets of experts used
        assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(norms[-1], rel=1e-5)
        assert registry.get_sample_value("training_grad_norm_sum_total", labels) == pytest.approx(sum(norms), rel=1e-5)
        assert len(_layers(registry)) == 18  # router, 16 experts, head
    finally:
        exp.close(stop_server=True)
    published = registry.get_sample_value("training_grad_norm", labels)
    print("\n" + matrix_line("MoE 16 experts top-2, 2000 steps", published, norms[-1],
                             f"grouping cache entries: {len(stats.layouts)}"))


def test_parameters_unfrozen_after_watch_enter_the_norm():
    model = model_of()
    for p in model[0].parameters():
        p.requires_grad_(False)  # frozen when watch() is called
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    exp, registry = _exporter("unfreeze")

    def unfreeze(i):
        assert (model[0].weight.grad is None) == (i < 10)

    try:
        exp.watch(model, optimizer)
        _train(exp, model, optimizer, 10, batch)
        for p in model[0].parameters():
            p.requires_grad_(True)
        norms = _train(exp, model, optimizer, 10, batch, before_step=lambda i: unfreeze(i + 10))
        exp.close()
        labels = {"run": "unfreeze", "rank": "0"}
        assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(norms[-1], rel=1e-5)
        assert registry.get_sample_value("training_layer_grad_norm", dict(labels, layer="0")) > 0
    finally:
        exp.close(stop_server=True)
    print("\n" + matrix_line("progressive unfreezing", registry.get_sample_value("training_grad_norm", labels),
                             norms[-1]))


def test_fp16_gradients_with_a_norm_above_fp16_range_stay_finite():
    torch.manual_seed(0)
    model = nn.Linear(1000, 100).half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    exp, registry = _exporter("fp16")

    def make_batch():
        return torch.ones(1, 1000, dtype=torch.float16), None

    try:
        exp.watch(model, optimizer)
        norms = []
        for _ in range(3):
            x, _ = make_batch()
            loss = model(x).float().sum() * 300  # every weight gradient 300: finite in fp16, the norm is not
            optimizer.zero_grad()
            loss.backward()
            assert torch.isfinite(model.weight.grad).all() and model.weight.grad.dtype == torch.float16
            norms.append(norm64(model.parameters()))
            optimizer.step()
            exp.log_step(loss=loss.detach())
        exp.close()
        labels = {"run": "fp16", "rank": "0"}
        assert norms[-1] > 65504
        assert registry.get_sample_value("training_grad_norm", labels) == pytest.approx(norms[-1], rel=1e-5)
        assert registry.get_sample_value("training_grad_nonfinite_total", labels) == 0
    finally:
        exp.close(stop_server=True)
    print("\n" + matrix_line("fp16 parameters", registry.get_sample_value("training_grad_norm", labels), norms[-1]))


def test_two_models_of_one_structure_keep_their_layer_norms_apart():
    a, b = model_of(seed=0), model_of(seed=1)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.02), torch.optim.SGD(b.parameters(), lr=0.02)
    exp, registry = _exporter("two-models")
    try:
        exp.watch(a, opt_a)
        exp.watch(b, opt_b, name="critic")
        x, y = batch()
        for model, opt in ((a, opt_a), (b, opt_b)):
            nn.functional.mse_loss(model(x), y).backward()
        expected = {"0": norm64(a[0].parameters()), "critic/0": norm64(b[0].parameters())}
        opt_a.step()
        opt_b.step()
        exp.log_step(loss=1.0)
        exp.close()
        assert _layers(registry) == ["0", "2", "4", "critic/0", "critic/2", "critic/4"]
        for layer, norm in expected.items():
            assert registry.get_sample_value("training_layer_grad_norm", {"run": "two-models", "rank": "0",
                                                                          "layer": layer}) == pytest.approx(norm)
    finally:
        exp.close(stop_server=True)


# ------------------------------------------------------------------------ the numbered defects of issue 8
def test_accumulation_logged_per_micro_batch_counts_optimizer_steps_and_a_nan_micro_batch():
    """Defect 1: micro-batch log_steps are not skipped steps, training_step follows optimizer steps, and a NaN
    micro-batch loss is counted."""
    row = Row("defect-1", nan_at=None)
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    row.exp.watch(model, optimizer)
    for i in range(3):
        optimizer.zero_grad()
        for m in range(4):
            x, y = batch(4)
            loss = nn.functional.mse_loss(model(x), y)
            (loss / 4).backward()
            if m == 3:
                optimizer.step()
            row.exp.log_step(loss=loss.detach() * float("nan") if (i, m) == (1, 2) else loss.detach())
    row.exp.close(stop_server=True)
    assert row.value("training_scaler_skipped_steps_total") == 0
    assert row.value("training_step") == 3
    assert row.value("training_loss_nonfinite_total") == 1
    assert row.value("training_loss_steps_total") == 3


def test_nonfinite_loss_on_a_step_whose_update_did_not_happen_is_counted():
    """Defect 2: a NaN loss on a step the scaler skipped is counted as a non-finite loss (and the skip as a skip)."""
    row = Row("defect-2", nan_at=None)
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    row.exp.watch(model, optimizer, scaler=scaler)
    for i in range(3):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y) * (float("nan") if i == 1 else 1.0)
        optimizer.zero_grad()
        scaler.scale(loss).backward()  # NaN gradients: the scaler skips this step
        scaler.step(optimizer)
        scaler.update()
        row.exp.log_step(loss=loss.detach())
    row.exp.close(stop_server=True)
    assert scaler.get_scale() == 2.0 ** 7
    assert row.value("training_loss_nonfinite_total") == 1
    assert row.value("training_scaler_skipped_steps_total") == 1
    assert row.value("training_grad_nonfinite_total") == 0
    assert row.value("training_step") == 3
    assert row.value("training_last_nonfinite_timestamp_seconds") is not None


def test_scaler_overflow_while_watching_without_optimizer_is_a_skip_not_a_nonfinite_gradient():
    """Defect 3: watch(model) with a GradScaler: the scaler's routine overflow is a skip, decided on the device."""
    row = Row("defect-3", nan_at=None)
    model = model_of()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    row.exp.watch(model, scaler=scaler)
    for i in range(4):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if i == 2:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        row.exp.log_step(loss=loss.detach())
    row.exp.close(stop_server=True)
    assert row.value("training_grad_nonfinite_total") == 0
    assert row.value("training_scaler_skipped_steps_total") == 1
    assert row.value("training_grad_norm_steps_total") == 3


def test_interval_logging_publishes_the_last_steps_norm_not_a_combination():
    """Defect 4: log_step every 10 optimizer steps publishes the last step's norm, each step's norm in the sums."""
    row = Row("defect-4", nan_at=None)
    interval(row)
    row.exp.close(stop_server=True)
    assert row.value("training_grad_norm") == pytest.approx(row.ref.norms[-1], rel=1e-6)
    assert row.value("training_grad_norm_steps_total") == STEPS


def test_watching_a_model_twice_counts_its_gradients_once(caplog):
    """Defect 5: watch(m) twice, and watch(m, opt) then watch(m), publish the true norm."""
    for second_with_optimizer_first in (False, True):
        row = Row(f"defect-5-{second_with_optimizer_first}", nan_at=None)
        model = model_of()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        with caplog.at_level("WARNING", logger="exporter"):
            if second_with_optimizer_first:
                row.exp.watch(model, optimizer)
            else:
                row.exp.watch(model)
            row.exp.watch(model)
        assert "already watched" in caplog.text
        x, y = batch()
        nn.functional.mse_loss(model(x), y).backward()
        expected = norm64(model.parameters())
        optimizer.step()
        row.exp.log_step(loss=1.0)
        row.exp.close(stop_server=True)
        assert row.value("training_grad_norm") == pytest.approx(expected, rel=1e-6)


class _Device:
    """Completion of the exporter's device copies under the test's control, as a GPU's events would report it."""

    def __init__(self, reader):
        self.running = False
        self.events = []
        reader_submit = reader.submit

        def submit(tensor, callback):
            reader_submit(tensor, callback)
            event = self._Event(self)
            self.events.append(event)
            reader._pending[-1] = (event,) + reader._pending[-1][1:]

        reader.submit = submit

    class _Event:
        def __init__(self, device):
            self.device, self.at = device, math.inf
            if device.running:
                self.at = time.monotonic() + 0.05

        def query(self):
            return time.monotonic() >= self.at

        def synchronize(self):
            self.at = min(self.at, time.monotonic())

    def run(self):
        """The device catches up: copies already queued land soon, new ones 50 ms after they are queued."""
        self.running = True
        for event in self.events:
            event.at = min(event.at, time.monotonic() + 0.05)


def test_scrape_publishes_what_the_device_finished_while_the_training_thread_is_elsewhere():
    """Defect 6: the last steps' values, a NaN among them, reach a scrape without another log_step."""
    row = Row("defect-6a", nan_at=None)
    device = _Device(row.exp._totals.reader)
    row.exp.log_step(loss=1.0)  # its snapshot is in flight ...
    row.exp.log_step(loss=float("nan"))  # ... so this step waits on the device
    assert row.value("training_loss_nonfinite_total") == 0
    device.run()  # the training thread now evaluates, checkpoints or hangs: no more log_step
    assert row.value("training_loss_nonfinite_total") == 1  # one scrape
    assert row.value("training_loss_steps_total") == 1
    row.exp.close(stop_server=True)


def test_close_publishes_every_step_while_a_snapshot_is_in_flight():
    """Defect 6: close() lands the snapshot in flight, then takes and lands the last one."""
    row = Row("defect-6b", nan_at=None)
    _Device(row.exp._totals.reader)
    for loss in (1.0, 2.0, float("inf")):
        row.exp.log_step(loss=loss)
    row.exp.close(stop_server=True)
    assert row.value("training_loss_steps_total") == 2
    assert row.value("training_loss_positive_sum_total") == 3.0
    assert row.value("training_loss_nonfinite_total") == 1


def test_log_step_after_close_is_a_no_op_warned_once(caplog):
    """Defect 6: a signal handler that closed the exporter does not crash the loop that still logs."""
    row = Row("defect-6c", nan_at=None)
    row.exp.log_step(loss=1.0)
    row.exp.close("interrupted", stop_server=True)
    with caplog.at_level("WARNING", logger="exporter"):
        for _ in range(3):
            row.exp.log_step(loss=2.0)
            row.exp.log_eval("val", loss=1.0)
    assert len([r for r in caplog.records if "after close()" in r.getMessage()]) == 1
    assert row.value("training_step") == 1
    assert row.value("training_run_status", status="interrupted") == 1


def test_recent_window_memory_is_bounded_whatever_the_scrape_cadence():
    """Defect 7: many unscraped steps keep a bounded window (it used to grow one entry per step)."""
    registry = CollectorRegistry()
    exp = TrainingExporter(run="defect-7", port=0, addr="127.0.0.1", registry=registry, max_window=0.016)
    try:
        start = time.monotonic()
        steps = 0
        while time.monotonic() - start < 0.3 or steps < 2000:  # many windows' worth of 1 ms buckets
            exp.log_step(loss=float(steps))
            steps += 1
        assert len(exp.state._recent) <= 17
        time.sleep(0.02)
        exp.log_step(loss=1.0)
        assert registry.get_sample_value("training_loss_recent_max", {"run": "defect-7", "rank": "0"}) == 1.0
    finally:
        exp.close(stop_server=True)
