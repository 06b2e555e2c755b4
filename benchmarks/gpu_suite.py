"""Every GPU figure of the host-cost work in one run: step time with and without the exporter, side by side.

    PYTHONPATH=. python3 benchmarks/gpu_suite.py            # on a GPU machine, from the repository root
    PYTHONPATH=. python3 benchmarks/gpu_suite.py --smoke    # tiny sizes, one round, runs on the CPU

Sections: a 152M-parameter transformer in bf16 autocast, a 1.2B one, a launch-bound MLP, then checks (no host
synchronisation under ``torch.cuda.set_sync_debug_mode("error")``, a ``torch.compile``d model, a CUDA graph).
Variants of a section run interleaved in rounds; each round times a run of steps between two synchronisations,
so the host may run ahead as in training. A variant's overhead is its step time over the bare step of the same
round; the median over rounds is printed with the spread (max - min) of those per-round ratios. A failing
variant or section is reported and the others go on. Writes ``$OUT/gpu_suite.json`` when ``OUT`` is set.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from exporter import TrainingExporter

T0 = time.monotonic()
BUDGET_S = 390.0  # sections that would start after this are skipped, so the run stays within 7 minutes


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ models
class Transformer(nn.Module):
    """Token embedding, pre-norm encoder layers (attention through SDPA), a final norm and a tied output."""

    def __init__(self, vocab: int, d: int, layers: int, device: torch.device) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, device=device)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, dropout=0.0, batch_first=True, norm_first=True,
                                       device=device) for _ in range(layers))
        self.norm = nn.LayerNorm(d, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) @ self.embed.weight.t()


def mlp(width: int, depth: int, device: torch.device) -> nn.Module:
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1)).to(device)


class Loop:
    """One model, its optimizer and batch; ``step(variant)`` runs one training step of that variant."""

    def __init__(self, model: nn.Module, batch, loss_fn, device: torch.device, autocast: bool) -> None:
        self.model, self.batch, self.loss_fn, self.device = model, batch, loss_fn, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        self.autocast = autocast
        self.exp: Optional[TrainingExporter] = None
        self.pinned = torch.empty(1, pin_memory=device.type == "cuda")
        self.params = list(model.parameters())

    def forward_backward(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        return loss

    def step(self, variant: str) -> None:
        loss = self.forward_backward()
        norm = None
        if variant in ("torch clip", "torch clip + grad_norm="):
            norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        elif variant == "fused clip":
            self.exp.clip_grad_norm_(self.params, 1.0)
        elif variant == "one-read floor":  # the device part no statistic avoids: one read of every gradient
            torch._foreach_norm([p.grad for p in self.params])
        elif variant == "minimal global norm":  # the least an eager global norm can cost: 3 launches, no hooks
            norms = torch._foreach_norm([p.grad for p in self.params])
            self.pinned.copy_(torch.linalg.vector_norm(torch.stack(norms)).reshape(1), non_blocking=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.exp is not None:
            self.exp.log_step(loss=loss.detach(), grad_norm=norm if variant == "torch clip + grad_norm=" else None)


# Per-layer norms are on by default; detail_every=1 adds the gradient mean (one kernel per tensor) every step.
EXPORTER_ARGS = {"exporter defaults": {}, "per-layer detail: 64 groups": {"layer_depth": 3, "max_layers": 64},
                 "per-layer detail + grad mean every step": {"detail_every": 1},
                 "torch clip + grad_norm=": {}, "fused clip": {}}


def attach(loop: Loop, variant: str) -> None:
    if variant in EXPORTER_ARGS:
        loop.exp = TrainingExporter(run="gpu-suite", port=0, addr="127.0.0.1", handle_sigterm=False,
                                    **EXPORTER_ARGS[variant])
        loop.exp.watch(loop.model, loop.optimizer)


def detach(loop: Loop) -> None:
    if loop.exp is not None:
        loop.exp.close(stop_server=True)
        loop.exp = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(loop: Loop, variant: str, steps: int) -> float:
    """Mean time of ``steps`` steps. On CUDA from events recorded between steps (what the device saw, waits for
    the host included), dropping steps over 3x the median: a host hiccup (another process, the OS) of tens of
    milliseconds would otherwise decide a round, while the exporter's own periodic work (a snapshot, a ring
    fold: a millisecond or two) stays in. On the CPU, the host clock over all steps."""
    sync(loop.device)
    if loop.device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            loop.step(variant)
        return (time.perf_counter() - start) / steps
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    marks[0].record()
    for i in range(steps):
        loop.step(variant)
        marks[i + 1].record()
    sync(loop.device)
    per_step = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    limit = 3 * statistics.median(per_step)
    kept = [t for t in per_step if t <= limit]
    return sum(kept) / len(kept)


def timed(loop: Loop, variants: List[str], rounds: int, steps: int, warmup: int) -> Dict[str, dict]:
    """Per-round mean step time of each variant (``step_time``), the variants interleaved in every round."""
    times: Dict[str, List[float]] = {v: [] for v in variants}
    errors: Dict[str, str] = {}
    for r in range(rounds):
        for variant in variants:
            if variant in errors:
                continue
            try:
                attach(loop, variant)
                for _ in range(warmup):
                    loop.step(variant)
                times[variant].append(step_time(loop, variant, steps))
            except Exception as exc:  # one variant failing must not lose the others
                errors[variant] = f"{type(exc).__name__}: {exc}"
                progress(f"  variant {variant!r} failed: {errors[variant]}")
                traceback.print_exc()
            finally:
                try:
                    detach(loop)
                except Exception:
                    loop.exp = None
                    traceback.print_exc()
        progress(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{v} {times[v][-1] * 1e3:.2f} ms" for v in variants if len(times[v]) == r + 1))
    return summarise(variants, times, errors)


def baseline(variant: str, variants: List[str]) -> str:
    """What a variant is compared with: the loop that clips without the exporter for the clipping variants."""
    if variant in ("torch clip + grad_norm=", "fused clip") and "torch clip" in variants:
        return "torch clip"
    return variants[0]


def summarise(variants: List[str], times: Dict[str, List[float]], errors: Dict[str, str]) -> Dict[str, dict]:
    rows = {}
    for variant in variants:
        row: dict = {"error": errors.get(variant)}
        if times[variant] and variant not in errors:
            base = baseline(variant, variants)
            row["median_ms"] = statistics.median(times[variant]) * 1e3
            row["rounds_ms"] = [t * 1e3 for t in times[variant]]
            if variant != base and base not in errors and len(times[base]) == len(times[variant]):
                paired = [t / b - 1 for t, b in zip(times[variant], times[base])]
                row["versus"] = base
                row["overhead_pct"] = 100 * statistics.median(paired)
                row["spread_pct"] = 100 * (max(paired) - min(paired))
                row["overhead_us"] = 1e6 * statistics.median([t - b for t, b in zip(times[variant], times[base])])
        rows[variant] = row
    return rows


# ---------------------------------------------------------------------------------------------- sections
def transformer_section(device, vocab, d, layers, seq, batch, variants, rounds, steps, warmup, autocast):
    torch.manual_seed(0)
    model = Transformer(vocab, d, layers, device)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    batch_ = (tokens[:, :-1], tokens[:, 1:])

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]).flatten(0, 1).float(), b[1].flatten())

    loop = Loop(model, batch_, loss_fn, device, autocast)
    n = sum(p.numel() for p in model.parameters())
    info = {"params": n, "tensors": len(loop.params), "d": d, "layers": layers, "seq": seq, "batch": batch}
    progress(f"  {n / 1e6:.1f}M parameters in {len(loop.params)} tensors")
    try:
        rows = timed(loop, variants, rounds, steps, warmup)
    finally:
        del loop, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": info, "rows": rows}


def mlp_section(device, width, depth, batch, variants, rounds, steps, warmup):
    torch.manual_seed(0)
    model = mlp(width, depth, device)
    data = (torch.randn(batch, width, device=device), torch.randn(batch, 1, device=device))
    loop = Loop(model, data, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), device, autocast=False)
    info = {"width": width, "depth": depth, "batch": batch, "tensors": len(loop.params)}
    return {"model": info, "rows": timed(loop, variants, rounds, steps, warmup)}


def sync_check(device, width):
    """Exporter steps (defaults, per-layer detail every step, fused clip) under sync-debug "error"."""
    if device.type != "cuda":
        return {"ok": None, "note": "no CUDA device: not run"}
    torch.manual_seed(0)
    loop = Loop(mlp(width, 4, device), (torch.randn(64, width, device=device), torch.randn(64, 1, device=device)),
                lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), device, autocast=False)
    checked = 0
    for variant in ("exporter defaults", "per-layer detail + grad mean every step", "fused clip"):
        attach(loop, variant)
        try:
            for _ in range(3):  # first steps: lazy allocations
                loop.step(variant)
            sync(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(30):
                    loop.step(variant)
                    checked += 1
            finally:
                torch.cuda.set_sync_debug_mode(0)
        finally:
            detach(loop)
    return {"ok": True, "steps_checked": checked}


def dispatch_check(device):
    """Aten ops the exporter adds to one step on this device (benchmarks/dispatch_count.py), 10 and 1,000 tensors."""
    from dispatch_count import exporter_ops

    counts = {}
    for variant in ("defaults", "fused clip"):
        for tensors in (10, 1000):
            total, per_op = exporter_ops(tensors, variant, device.type)
            counts[f"{variant}, {tensors} tensors"] = total
            if tensors == 1000:
                counts[f"{variant}, ops"] = per_op
    return counts


def published_norm(exp: TrainingExporter) -> float:
    exp.close(stop_server=True)
    return exp.registry.get_sample_value("training_grad_norm", {"run": exp.run, "rank": str(exp.rank)})


def reference_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


def compile_check(device, width):
    """A ``torch.compile``d model watched: the published norm equals the eager norm of the same gradients."""
    torch.manual_seed(0)
    model = mlp(width, 4, device)
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    exp = TrainingExporter(run="compile", port=0, addr="127.0.0.1", handle_sigterm=False)
    exp.watch(compiled, optimizer)
    x, y = torch.randn(64, width, device=device), torch.randn(64, 1, device=device)
    start = time.monotonic()
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        optimizer.step()
        exp.log_step(loss=loss.detach())
    expected = reference_norm(model.parameters())
    got = published_norm(exp)
    ok = math.isclose(got, expected, rel_tol=1e-5)
    return {"ok": ok, "published": got, "eager_reference": expected, "compile_and_steps_s": time.monotonic() - start}


def graph_check(device, width):
    """A captured step: the optimizer's hooks refuse the capture with a clear error; the supported pattern
    (watch the model only, log_step after replay) publishes the static gradients' norm."""
    if device.type != "cuda":
        return {"ok": None, "note": "no CUDA device: not run"}
    torch.manual_seed(0)
    model = mlp(width, 4, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
    x, y = torch.randn(64, width, device=device), torch.randn(64, 1, device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step()
    exp = TrainingExporter(run="graph", port=0, addr="127.0.0.1", handle_sigterm=False)
    exp.watch(model)
    for _ in range(5):
        graph.replay()
        exp.log_step(loss=static_loss)
    expected = reference_norm(model.parameters())
    got = published_norm(exp)
    result = {"replayed_norm_ok": math.isclose(got, expected, rel_tol=1e-5), "published": got, "reference": expected}
    hooked = TrainingExporter(run="graph-hooks", port=0, addr="127.0.0.1", handle_sigterm=False)
    hooked.watch(model, optimizer)
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            train_step()
        result["hooks_in_capture"] = "no error raised"
    except RuntimeError as exc:
        result["hooks_in_capture"] = f"RuntimeError: {exc}"
    finally:
        hooked.close(stop_server=True)
    result["ok"] = result["replayed_norm_ok"] and "CUDA graph capture" in result["hooks_in_capture"]
    return result


# ---------------------------------------------------------------------------------------------- report
def run_section(results: dict, name: str, fn: Callable, *args) -> None:
    if time.monotonic() - T0 > BUDGET_S:
        results[name] = {"error": f"skipped: past the {BUDGET_S:.0f} s budget"}
        progress(f"{name}: skipped (time budget)")
        return
    progress(f"{name} ...")
    try:
        results[name] = fn(*args)
    except Exception as exc:
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    progress(f"{name} done")


def markdown(results: dict) -> str:
    lines = ["| model | variant | median step | versus | overhead (median of rounds) | spread between rounds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, section in results.items():
        if "rows" not in section:
            continue
        for variant, row in section["rows"].items():
            if row.get("error"):
                lines.append(f"| {name} | {variant} | failed: {row['error']} | | | |")
            elif "overhead_pct" in row:
                lines.append(f"| {name} | {variant} | {row['median_ms']:.3f} ms | {row['versus']} | "
                             f"{row['overhead_pct']:+.2f}% ({row['overhead_us']:+.0f} µs) | {row['spread_pct']:.2f} pp |")
            else:
                lines.append(f"| {name} | {variant} | {row.get('median_ms', float('nan')):.3f} ms | | | |")
    lines += ["", "| check | result |", "| --- | --- |"]
    for name, section in results.items():
        if "rows" in section:
            if "error" in section:
                lines.append(f"| {name} | failed: {section['error']} |")
            continue
        lines.append(f"| {name} | {json.dumps(section, default=str)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: a check that it runs (CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    progress(f"torch {torch.__version__}, device {device} ({card}), smoke={smoke}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rounds = 1 if smoke else 5
    autocast = device.type == "cuda"
    results: dict = {}
    big = ["bare", "exporter defaults", "per-layer detail: 64 groups", "per-layer detail + grad mean every step", "torch clip", "torch clip + grad_norm=", "fused clip"]
    run_section(results, "152M transformer bf16", transformer_section, device, 1024 if not smoke else 64,
                1024 if not smoke else 32, 12 if not smoke else 2, 512 if not smoke else 16, 16 if not smoke else 2,
                big, rounds, 60 if not smoke else 2, 3 if not smoke else 1, autocast)
    run_section(results, "1.2B transformer bf16", transformer_section, device, 1024 if not smoke else 64,
                2048 if not smoke else 32, 24 if not smoke else 3, 512 if not smoke else 16, 8 if not smoke else 2,
                ["bare", "exporter defaults", "one-read floor", "torch clip", "fused clip"], rounds,
                16 if not smoke else 2, 2 if not smoke else 1, autocast)
    run_section(results, "MLP 8x512 batch 64", mlp_section, device, 512 if not smoke else 32, 8, 64,
                ["bare", "minimal global norm", "exporter defaults"], rounds, 500 if not smoke else 3,
                20 if not smoke else 1)
    run_section(results, "sync-debug error", sync_check, device, 512)
    run_section(results, "aten ops per step", dispatch_check, device)
    run_section(results, "torch.compile", compile_check, device, 512 if not smoke else 32)
    run_section(results, "CUDA graph", graph_check, device, 512)
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": card, "smoke": smoke,
            "rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "PYTHONPATH=. python3 benchmarks/gpu_suite.py" + (" --smoke" if smoke else ""),
            "wall_s": round(time.monotonic() - T0, 1)}
    print(f"\n## gpu_suite: {card}, torch {torch.__version__}, {meta['date']}, {rounds} interleaved rounds\n")
    print(markdown(results), flush=True)
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "gpu_suite.json")
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
        progress(f"wrote {path}")
    failed = [n for n, s in results.items() if s.get("error") or s.get("ok") is False
              or any(r.get("error") for r in s.get("rows", {}).values())]
    progress(f"finished in {meta['wall_s']} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
