"""What a scrape costs: the exposition's render time at three sizes, and the training thread's step time while
Prometheus scrapes once a second, printed as tables.

    python benchmarks/scrape_cost.py [--rounds 30] [--seconds 2] [--renders 200]

Render table: one exporter per size, rendered as ``/metrics`` renders it (the device reads landed, every family
collected and encoded); median and 90th percentile over ``renders`` renders per format, the body's size, the time
of a whole HTTP GET on loopback as Prometheus sends it (OpenMetrics, gzip), and prometheus_client's own encoder
over the same state and over labelled ``Gauge`` series of the same count, for comparison. Sizes: the defaults
(``watch(model, optimizer)`` on a transformer, ``log_step``, ``log_eval`` with three metrics), then 1,000 and 10,000
series of evaluation metrics (``max_eval_series``; 8 and 16 splits).

Step table: a thread makes 1 ms pure-Python steps with ``log_step`` each; another process scrapes the exporter
once a second over HTTP (paused by SIGSTOP between its phases). Phases without and with the scraper alternate, in
``rounds`` rounds of two phases of ``seconds`` each, so that both see the same noise from the rest of the machine;
the table gives the percentiles of the step times of all phases of each kind, then the p99 increase over all
steps and the median and quartiles of each round's increase, and the CPU time the exporter's server threads spent
per scrape (the most a scrape can hold the GIL from the training thread).
"""
import argparse
import gzip
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import torch
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.registry import Collector
from torch import nn

from exporter import TrainingExporter
from exporter.exposition import choose_encoder

TEXT = "text/plain; version=0.0.4"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# What Prometheus 2.x and 3.x send by default.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")

SCRAPER = """
import sys, time, urllib.request
url, accept, every = sys.argv[1], sys.argv[2], float(sys.argv[3])
request = urllib.request.Request(url, headers={"Accept": accept, "Accept-Encoding": "gzip"})
next_at = time.monotonic()
while True:
    urllib.request.urlopen(request, timeout=10).read()
    next_at = max(next_at + every, time.monotonic())  # after a SIGSTOP: no burst to catch up
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


def exporter_with(series: str) -> TrainingExporter:
    """An exporter in one of the benchmark's configurations, after a few training steps and evaluations."""
    exp = TrainingExporter(run=f"scrape-cost-{series}", port=0, addr="127.0.0.1", close_timeout=0,
                           max_eval_series=SPLITS[series] * METRICS[series],
                           config={"lr": 3e-4, "batch_size": 32, "model": "tiny"})
    layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
    model = nn.Sequential(nn.Embedding(1000, 256), nn.TransformerEncoder(layer, 6), nn.Linear(256, 1000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    exp.watch(model, optimizer)
    tokens = torch.randint(0, 1000, (4, 32))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        exp.log_step(loss=loss, samples=4)
    evaluate(exp, series, 0.5)
    exp.log_step(loss=1.0)
    return exp


SPLITS = {"default": 1, "1k": 8, "10k": 16}
METRICS = {"default": 3, "1k": 125, "10k": 625}


def evaluate(exp: TrainingExporter, series: str, base: float) -> None:
    """An evaluation of every split with every metric of the configuration, each value new."""
    names = ["accuracy", "f1", "auc"] if series == "default" else [f"class_{i:03d}_recall" for i in
                                                                    range(METRICS[series])]
    for s in range(SPLITS[series]):
        exp.log_eval("val" if s == 0 else f"val_{s}", loss=2.0 + s + base,
                     metrics={n: base + i * 1e-4 for i, n in enumerate(names)})


def timed(fn, n: int, before=None) -> list:
    """Milliseconds of ``n`` calls of ``fn``, each after an untimed call of ``before``."""
    times = []
    for _ in range(n):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def med_p90(times: list) -> str:
    times = sorted(times)
    return f"{statistics.median(times):.2f} / {times[int(0.9 * (len(times) - 1))]:.2f}"


def gauges_like(count: int) -> CollectorRegistry:
    """prometheus_client's labelled gauges: ``count`` series, as an exporter built on them would serve."""
    registry = CollectorRegistry()
    gauge = Gauge("training_eval_metric", "Task metrics.", ["run", "rank", "split", "metric"], registry=registry)
    for i in range(count):
        gauge.labels("scrape-cost", "0", f"val_{i % 16}", f"class_{i // 16:04d}_recall").set(0.5 + i * 1e-4)
    return registry


def render_table(renders: int) -> None:
    print("| series | text ms (median / p90) | OpenMetrics ms | text ms, every eval value new | text bytes | "
          "HTTP GET ms (OpenMetrics, gzip) | prometheus_client encoder, same state | "
          "prometheus_client labelled Gauges, same count |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for series in ("default", "1k", "10k"):
        exp = exporter_with(series)
        n = renders if series != "10k" else max(20, renders // 5)
        text_encoder, _ = choose_encoder(TEXT)
        om_encoder, _ = choose_encoder(OPENMETRICS)
        body = text_encoder(exp.registry)
        count = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
        counter = iter(range(1, 1 << 30))

        def step():  # between two scrapes the loop steps: the per-step series change, the evaluations hold
            exp.log_step(loss=1.0 / next(counter), samples=4)

        text_ms = timed(lambda: text_encoder(exp.registry), n, step)
        om_ms = timed(lambda: om_encoder(exp.registry), n, step)
        new_ms = timed(lambda: text_encoder(exp.registry), max(10, n // 4),
                       lambda: evaluate(exp, series, next(counter)))
        request = urllib.request.Request(f"http://127.0.0.1:{exp.port}/metrics",
                                         headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
        get_ms = timed(lambda: gzip.decompress(urllib.request.urlopen(request, timeout=10).read()), n, step)
        client_ms = timed(lambda: generate_latest(exp.registry), max(10, n // 4), step)
        gauges = gauges_like(count)
        gauges_ms = timed(lambda: generate_latest(gauges), max(10, n // 4))
        print(f"| {count:,} ({series}) | {med_p90(text_ms)} | {med_p90(om_ms)} | {med_p90(new_ms)} | {len(body):,} | "
              f"{med_p90(get_ms)} | {med_p90(client_ms)} | {med_p90(gauges_ms)} |")
        exp.close(stop_server=True)


def busy_steps(exp: TrainingExporter, seconds: float) -> list:
    """1 ms pure-Python steps, each ending with ``log_step``: the step times in ms."""
    times = []
    end = time.perf_counter() + seconds
    step = 0
    while time.perf_counter() < end:
        started = time.perf_counter()
        while time.perf_counter() - started < 1e-3:
            pass
        step += 1
        exp.log_step(loss=1.0 / step, samples=32)
        times.append((time.perf_counter() - started) * 1e3)
    return times


def percentile(times: list, q: float) -> float:
    times = sorted(times)
    return times[min(len(times) - 1, int(q * len(times)))]


class Scrapes(Collector):
    """Counts the scrapes of the registry it joins (one ``collect`` each), adding no series."""

    def __init__(self) -> None:
        self.count = 0

    def collect(self) -> list:
        self.count += 1
        return []


def server_cpu_seconds() -> float:
    """CPU time of the exporter's server threads (accepting, rendering, compressing, sending) so far."""
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threading.enumerate()
               if t.name.startswith("metrics-"))


def step_table(rounds: int, seconds: float) -> None:
    print("| exposition | scraper | steps | p50 ms | p99 ms | p99.9 ms | max ms | steps over 2 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    increases, cpus = {}, {}
    for series in ("default", "10k"):
        exp = exporter_with(series)
        url = f"http://127.0.0.1:{exp.port}/metrics"
        phases = {"none": [], "1/s": []}
        scrapes = Scrapes()
        exp.registry.register(scrapes)
        cpu = {"none": 0.0, "1/s": 0.0}
        # Started once and paused between its phases, so that no phase pays for an interpreter's start.
        scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url, PROMETHEUS_ACCEPT, "1"])
        try:
            time.sleep(2)
            busy_steps(exp, 2)  # warm-up, scraped
            scrapes.count = 0
            for i in range(rounds):
                # Short phases, in alternating order: both see the same noise from the rest of the machine.
                for name in (("none", "1/s") if i % 2 == 0 else ("1/s", "none")):
                    scraper.send_signal(signal.SIGSTOP if name == "none" else signal.SIGCONT)
                    started = server_cpu_seconds()
                    phases[name].append(busy_steps(exp, seconds))
                    cpu[name] += server_cpu_seconds() - started
            if scraper.poll() is not None:
                raise RuntimeError(f"the scraper ended early (exit status {scraper.returncode})")
        finally:
            scraper.kill()
            scraper.wait()
        pooled = {name: [t for r in runs for t in r] for name, runs in phases.items()}
        for name, times in pooled.items():
            print(f"| {series} | {name} | {len(times):,} | {percentile(times, 0.5):.3f} | "
                  f"{percentile(times, 0.99):.3f} | {percentile(times, 0.999):.3f} | {max(times):.2f} | "
                  f"{sum(t > 2 for t in times):,} |")
        cpus[series] = (scrapes.count, cpu["1/s"] - cpu["none"])  # less what the server spends idle
        increases[series] = (percentile(pooled["1/s"], 0.99) - percentile(pooled["none"], 0.99),
                             [percentile(b, 0.99) - percentile(a, 0.99) for a, b in zip(phases["none"], phases["1/s"])])
        exp.close(stop_server=True)
    for series, (pooled, rounds_up) in increases.items():
        quartiles = statistics.quantiles(rounds_up, n=4)
        print(f"p99 increase with one scrape a second, {series}: {pooled:+.3f} ms over all steps; per round median "
              f"{statistics.median(rounds_up):+.3f} ms, quartiles {quartiles[0]:+.3f} to {quartiles[2]:+.3f} ms "
              f"({len(rounds_up)} rounds)")
    for series, (count, cpu) in cpus.items():
        print(f"CPU of the exporter's server threads per scrape, {series}: {cpu / max(count, 1) * 1e3:.2f} ms "
              f"({count} scrapes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=2)
    parser.add_argument("--renders", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{time.strftime('%Y-%m-%d', time.gmtime())}; {cpu}, {os.cpu_count()} CPUs; Python "
          f"{platform.python_version()}, torch {torch.__version__}")
    render_table(args.renders)
    print()
    step_table(args.rounds, args.seconds)


if __name__ == "__main__":
    main()
