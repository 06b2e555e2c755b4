"""One rank of a multi-process loop-shape row, started by ``torchrun --nproc_per_node 2`` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/loop_shapes_dist.py {ddp,fsdp2} OUT_DIR

Each rank trains a small MLP wrapped in DDP or sharded with FSDP2 (``fully_shard``) under the exporter and
writes OUT_DIR/RANK.json: what its exporters published and its float64 reference (the squared norm of its own
gradients, computed from the gradients themselves). The test combines the ranks.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn

from exporter import TrainingExporter

STEPS = 20


def model_of() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def local_sq(params) -> float:
    """float64 sum of squares of this rank's gradients (its shards under FSDP2)."""
    total = 0.0
    for p in params:
        g = p.grad
        if g is not None:
            g = g.to_local() if hasattr(g, "to_local") else g
            total += float((g.double() ** 2).sum())
    return total


def published(exp: TrainingExporter, registry: CollectorRegistry) -> dict:
    labels = {"run": exp.run, "rank": str(exp.rank)}
    names = ("training_step", "training_grad_norm", "training_grad_norm_shard_squared", "training_grad_norm_sum_total",
             "training_grad_norm_steps_total", "training_loss_steps_total", "training_grad_nonfinite_total")
    out = {name: registry.get_sample_value(name, labels) for name in names}
    out["errors"] = sum(s.value for m in registry.collect() if m.name == "training_exporter_errors"
                        for s in m.samples if s.name.endswith("_total"))
    out["layers"] = sorted(s.labels["layer"] for m in registry.collect() if m.name == "training_layer_grad_norm"
                           for s in m.samples)
    return out


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = model_of()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    clipped_reg, local_reg, flat_reg = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    # One exporter is passed the clipping norm, one is not (rank-local norm and shard share), and one has no
    # per-layer norms (layer_depth=0), the case that used to fault at every log_step.
    clipped = TrainingExporter(run=f"{mode}-clip", port=0, addr="127.0.0.1", registry=clipped_reg)
    local = TrainingExporter(run=f"{mode}-local", port=0, addr="127.0.0.1", registry=local_reg)
    flat = TrainingExporter(run=f"{mode}-flat", port=0, addr="127.0.0.1", registry=flat_reg, layer_depth=0)
    for exp in (clipped, local, flat):
        exp.watch(model, optimizer)
    torch.manual_seed(100 + rank)
    ref_sq, clip_norms = [], []
    for _ in range(STEPS):
        x = torch.randn(16, 8)
        loss = nn.functional.mse_loss(model(x), x[:, :2] * 3)
        optimizer.zero_grad()
        loss.backward()
        ref_sq.append(local_sq(model.parameters()))
        # The global norm, a collective of the loop's own; a replicated DTensor under FSDP2, passed as is.
        norm = nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        clip_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        optimizer.step()
        clipped.log_step(loss=loss.detach(), grad_norm=norm)
        local.log_step(loss=loss.detach())
        flat.log_step(loss=loss.detach())
    result = {"rank": rank, "ref_sq": ref_sq, "clip_norms": clip_norms}
    for name, exp, registry in (("clip", clipped, clipped_reg), ("local", local, local_reg),
                                ("flat", flat, flat_reg)):
        exp.close(stop_server=True)
        result[name] = published(exp, registry)
    (out / f"{rank}.json").write_text(json.dumps(result, default=lambda v: None if v is None else float(v)))
    dist.barrier()
    dist.destroy_process_group()
    assert all(math.isfinite(v) for v in ref_sq)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
