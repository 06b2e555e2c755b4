"""Step time of a training loop with and without a scrape storm at its exporter, printed as a table.

    python benchmarks/scrape_storm.py [--rate 300] [--seconds 60] [--rounds 2]

The loop (an MLP on the CPU, one thread) runs in this process with its exporter; the storm comes from another
process (so its own Python costs this one nothing) at ``rate`` scrapes a second. Quiet and storm phases
alternate in rounds; medians and 99th percentiles of the step time are reported, with the server's thread
count and the process's resident memory before and after the storms.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from exporter import TrainingExporter

STORM = """
import sys, threading, time, urllib.request
url, rate, seconds, clients = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), 8
ok = failed = 0
lock = threading.Lock()
end = time.monotonic() + seconds
def client(i):
    global ok, failed
    next_at = time.monotonic() + i / rate
    while next_at < end:
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += clients / rate
        try:
            urllib.request.urlopen(url, timeout=5).read()
            with lock: ok += 1
        except OSError:
            with lock: failed += 1
threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
[t.start() for t in threads]; [t.join() for t in threads]
print(ok, failed)
"""


def status() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"threads": int(fields["Threads"]), "rss_mb": int(fields["VmRSS"].split()[0]) / 1024}


def train_for(seconds: float, model, optimizer, exp, until=None) -> list:
    times = []
    end = time.monotonic() + seconds
    x, y = torch.randn(64, 256), torch.randn(64, 1)
    while time.monotonic() < end and (until is None or until.poll() is None):
        started = time.perf_counter()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        exp.log_step(loss=loss, samples=64)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1))
    optimizer = torch.optim.Adam(model.parameters())
    exp = TrainingExporter(run="storm-bench", port=0, addr="127.0.0.1", close_timeout=0)
    exp.watch(model, optimizer)
    url = f"http://127.0.0.1:{exp.port}/metrics"
    train_for(5, model, optimizer, exp)  # warm-up
    quiet, stormy, served, failed = [], [], 0, 0
    before = status()
    for _ in range(args.rounds):
        quiet += train_for(args.seconds, model, optimizer, exp)
        storm = subprocess.Popen([sys.executable, "-c", STORM, url, str(args.rate), str(args.seconds)],
                                 stdout=subprocess.PIPE, text=True)
        stormy += train_for(args.seconds + 30, model, optimizer, exp, until=storm)
        ok, bad = map(int, storm.communicate()[0].split())
        served, failed = served + ok, failed + bad
    after = status()
    exp.close(stop_server=True)

    def row(name, times):
        times = sorted(times)
        p99 = times[int(0.99 * (len(times) - 1))]
        return f"| {name} | {len(times)} | {statistics.median(times) * 1e3:.2f} ms | {p99 * 1e3:.2f} ms |"

    storm_seconds = args.rounds * args.seconds
    print(f"{args.rounds} rounds of {args.seconds:.0f} s quiet, {args.seconds:.0f} s storm at {args.rate:.0f}/s "
          f"(served {served}, {served / storm_seconds:.0f}/s; failed {failed}); torch {torch.__version__}")
    print("| phase | steps | median step | p99 step |\n| --- | --- | --- | --- |")
    print(row("quiet", quiet))
    print(row("scrape storm", stormy))
    print(f"threads {before['threads']} -> {after['threads']}; RSS {before['rss_mb']:.1f} -> {after['rss_mb']:.1f} MB "
          f"(+{after['rss_mb'] - before['rss_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
