"""Record the corpus's real trainings: tiny torch models trained on CPU (seconds each), deterministic seeds.

Each training writes ``recorded/<name>.json``: per step the train loss, the gradient norm (before clipping) and
the learning rate; per evaluation the val loss and accuracy. The corpus runs that name a recording
(``recorded: <name>``) replay it step by step through the real exporter at their own cadence.

    python tests/corpus/record_trainings.py      # rewrites tests/corpus/recorded/*.json
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

OUT = Path(__file__).resolve().parent / "recorded"
STEPS, EVAL_EVERY, BATCH, FEATURES, CLASSES = 3600, 100, 32, 16, 4


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def _student(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, CLASSES))


def _labelled(teacher: nn.Module, n: int, gen: torch.Generator):
    x = torch.randn(n, FEATURES, generator=gen)
    with torch.no_grad():
        return x, teacher(x).argmax(1)


def train(name: str, seed: int, *, width: int, lr: float, schedule: str = "constant", train_size: int = 0,
          label_noise: float = 0.0, corrupt_from: int = STEPS) -> dict:
    """One training. ``train_size``: a fixed set of that many samples (0: a fresh batch every step);
    ``label_noise``: the fraction of those samples given a random label; ``corrupt_from``: from this step on, a
    growing fraction of each fresh batch (0 there, all at the last step) gets a random label, as a data pipeline
    going bad does."""
    torch.set_num_threads(1)
    teacher = _teacher(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    val_x, val_y = _labelled(teacher, 2048, gen)
    if train_size:
        train_x, train_y = _labelled(teacher, train_size, gen)
        noisy = torch.rand(train_size, generator=gen) < label_noise
        train_y = torch.where(noisy, torch.randint(0, CLASSES, (train_size,), generator=gen), train_y)
    torch.manual_seed(seed + 2)
    model = _student(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = STEPS // 20
    rec = {k: [] for k in ("loss", "grad_norm", "lr", "eval_step", "eval_loss", "eval_accuracy")}
    for step in range(1, STEPS + 1):
        if schedule == "cosine":
            now = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        else:
            now = lr
        for group in opt.param_groups:
            group["lr"] = now
        if train_size:
            idx = torch.randint(0, train_size, (BATCH,), generator=gen)
            x, y = train_x[idx], train_y[idx]
        else:
            x, y = _labelled(teacher, BATCH, gen)
            if step > corrupt_from:
                bad = torch.rand(BATCH, generator=gen) < (step - corrupt_from) / (STEPS - corrupt_from)
                y = torch.where(bad, torch.randint(0, CLASSES, (BATCH,), generator=gen), y)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        rec["loss"].append(loss.item())
        rec["grad_norm"].append(norm.item())
        rec["lr"].append(now)
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                logits = model(val_x)
            rec["eval_step"].append(step)
            rec["eval_loss"].append(F.cross_entropy(logits, val_y).item())
            rec["eval_accuracy"].append((logits.argmax(1) == val_y).float().mean().item())
    rounded = {k: [float(f"{v:.5g}") for v in vs] if k != "eval_step" else vs for k, vs in rec.items()}
    # Where the pathology begins: the corruption's first step, or the best evaluation of a memorising run.
    best = rounded["eval_step"][rounded["eval_loss"].index(min(rounded["eval_loss"]))]
    onset = corrupt_from if corrupt_from < STEPS else (best if label_noise else None)
    return {"name": name, "seed": seed, "steps": STEPS, "eval_every": EVAL_EVERY, "onset_step": onset, **rounded}


TRAININGS = {
    # Fresh data every step, cosine schedule with warmup: healthy.
    "real-healthy": dict(seed=201, width=64, lr=3e-3, schedule="cosine"),
    # 1024 samples, 30% of them mislabelled, a wide model: it memorises them and the val loss turns up.
    "real-overfit": dict(seed=202, width=256, lr=3e-4, train_size=1024, label_noise=0.3),
    # Healthy until half-way, then a growing share of each batch carries random labels: the train loss climbs.
    "real-diverge": dict(seed=203, width=64, lr=3e-3, corrupt_from=STEPS // 2),
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, kwargs in TRAININGS.items():
        rec = train(name, **kwargs)
        (OUT / f"{name}.json").write_text(json.dumps(rec, separators=(",", ":")) + "\n")
        print(f"{name}: {rec['steps']} steps, loss {rec['loss'][0]:.3f} -> {sum(rec['loss'][-100:]) / 100:.3f}, "
              f"val loss {min(rec['eval_loss']):.3f} at best, {rec['eval_loss'][-1]:.3f} last; onset at step "
              f"{rec['onset_step']}")


if __name__ == "__main__":
    main()
