"""Cost of the exporter per training step and per scrape, printed as a table.

    python benchmarks/step_overhead.py [--steps 200] [--device cpu|cuda]

Variants are interleaved in rounds so that drift of a noisy machine spreads over all of them; medians are
reported. On CUDA the step ends with a synchronize so each step's wall time is the device's.
"""
import argparse
import statistics
import time

import torch
from prometheus_client import generate_latest
from torch import nn

from exporter import TrainingExporter


def make_model(width: int, depth: int, device: str) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1)).to(device)


def seed_stats(model: nn.Module) -> float:
    """The seed's get_gradient_stats: one .item() per parameter."""
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mean().item()
            total += p.grad.norm(2).item() ** 2
    return total ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_model(args.width, args.depth, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.width, device=args.device)
    y = torch.randn(args.batch, 1, device=args.device)
    exp = None
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step(variant: str) -> None:
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if variant == "seed .item() per parameter":
            seed_stats(model)
        elif variant == "minimal global norm":  # _foreach_norm, one stack, one norm, one copy: no hooks, no ring
            norms = torch._foreach_norm([p.grad for p in model.parameters()])
            pinned.copy_(torch.linalg.vector_norm(torch.stack(norms)).reshape(1), non_blocking=True)
        optimizer.step()
        if variant == "exporter (watch + log_step)":
            exp.log_step(loss=loss, samples=args.batch)

    variants = ["none", "seed .item() per parameter", "minimal global norm", "exporter (watch + log_step)"]
    pinned = torch.empty(1, pin_memory=args.device == "cuda")
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            if variant.startswith("exporter"):  # a fresh exporter each round; close() removes its hooks
                exp = TrainingExporter(run="bench", port=0, addr="127.0.0.1")
                exp.watch(model, optimizer)
            for _ in range(args.steps):
                t = time.perf_counter()
                step(variant)
                sync()
                times[variant].append(time.perf_counter() - t)
            if variant.startswith("exporter"):
                exp.close(stop_server=True)
    base = statistics.median(times["none"])
    n_params = sum(1 for _ in model.parameters())
    print(f"device {args.device}, MLP {args.depth}x{args.width} ({n_params} tensors), batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| gradient statistics per step | median step | overhead |\n| --- | --- | --- |")
    for variant in variants:
        med = statistics.median(times[variant])
        print(f"| {variant} | {med * 1e3:.3f} ms | {100 * (med / base - 1):+.1f}% |")

    scrapes = []
    for _ in range(50):
        t = time.perf_counter()
        generate_latest(exp.registry)
        scrapes.append(time.perf_counter() - t)
    series = sum(len(m.samples) for m in exp.registry.collect())
    print(f"\nscrape: {series} samples, median {statistics.median(scrapes) * 1e3:.2f} ms "
          f"(max {max(scrapes) * 1e3:.2f} ms) for generate_latest")


if __name__ == "__main__":
    main()
