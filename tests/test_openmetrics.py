"""The generator's OpenMetrics output, backfilled with promtool into a real Prometheus and queried back."""
from __future__ import annotations

import io
import itertools
import math
import subprocess
import time
from pathlib import Path

from exporter.ops.scorecard import load_corpus
from exporter.ops.simulate import OpenMetricsRun, scrape_series, write_openmetrics
from exporter.stack.servers import Prometheus, binary

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus" / "corpus.yaml"
LABELS = {"job": "training", "instance": "node-7:9946", "namespace": "team-a", "rank": "1"}


def _family_blocks(text: str):
    """Family names in the order their lines appear, consecutive repeats collapsed."""
    names = (line.split("{", 1)[0] for line in text.splitlines() if not line.startswith("#"))
    return [name for name, _ in itertools.groupby(names)]


def test_write_groups_families_and_relabels():
    series = {'training_loss{rank="0",run="r",split="train"}': [1.5, None, math.nan],
              'training_step{rank="0",run="r"}': [1.0, 2.0, math.inf],
              "up{}": [1.0, 1.0, 0.0]}
    rendered = OpenMetricsRun(series, scrape=15, start=1000)
    buf = io.StringIO()
    count = write_openmetrics(buf, [(rendered, {"rank": "0", "instance": "a"}),
                                    (rendered, {"rank": "1", "instance": 'b"\\'})])
    text = buf.getvalue()
    assert count == 6
    assert text.endswith("\n# EOF\n")
    blocks = _family_blocks(text)
    assert blocks == sorted(set(blocks)) == ["training_loss", "training_step", "up"]
    assert 'training_loss{instance="a",rank="0",run="r",split="train"} 1.5 1000.000\n' in text
    assert 'training_loss{instance="a",rank="0",run="r",split="train"} NaN 1030.000\n' in text
    assert "1015.000" not in text.split("training_step", 1)[0]  # the missing scrape writes no sample
    assert 'training_step{instance="b\\"\\\\",rank="1",run="r"} +Inf 1030.000\n' in text
    assert 'up{instance="b\\"\\\\",rank="1"} 0.0 1030.000\n' in text


def test_backfilled_run_reads_back_as_served(tmp_path):
    run = next(r for r in load_corpus(CORPUS) if r.name == "t-nan-mild-1min")  # NaN losses, 360 scrapes
    start = math.floor(time.time() - run.duration)
    served = scrape_series(run, origin=start)
    text = io.StringIO()
    count = write_openmetrics(text, [(OpenMetricsRun(served, run.scrape, start), LABELS)])
    assert count == len(served)
    source = tmp_path / "run.om"
    source.write_text(text.getvalue())
    data = tmp_path / "prometheus-data"
    subprocess.run([binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
                   check=True, capture_output=True, timeout=60)
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1m\n")
    with Prometheus(config, tmp_path) as prom:
        prom.wait_ready()
        stored = prom.query(f'count({{run="{run.name}"}})')
        assert stored[0]["value"] == sum(1 for key in served if f'run="{run.name}"' in key)
        loss_key = f'training_loss{{rank="0",run="{run.name}",split="train"}}'
        nan_at = next(k for k, v in enumerate(served[loss_key]) if v is not None and math.isnan(v))
        probes = [(loss_key, 10), (loss_key, nan_at), (loss_key, len(served[loss_key]) - 1),
                  (f'training_loss_positive_sum_total{{rank="0",run="{run.name}"}}', 200),
                  (f'training_last_step_timestamp_seconds{{rank="0",run="{run.name}"}}', 300)]
        for key, k in probes:
            name, inner = key.split("{", 1)
            selector = name + "{" + inner.replace('rank="0"', 'rank="1"')
            got = prom.query(selector, time_=start + k * run.scrape)
            assert len(got) == 1, (selector, got)
            assert got[0]["metric"]["instance"] == LABELS["instance"]
            want = served[key][k]
            assert (math.isnan(got[0]["value"]) and math.isnan(want)) or got[0]["value"] == want, (key, k)
        # The exporter's timestamps count from the run's start on the wall clock, as a live run's would.
        last = prom.query(f'training_last_step_timestamp_seconds{{run="{run.name}"}}',
                          time_=start + run.duration - run.scrape)
        assert start + run.duration - 3 * 60 <= last[0]["value"] <= start + run.duration
