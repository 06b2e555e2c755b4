"""The exporter as a real Prometheus server sees it: scraped on loopback, read back through the query API."""
import subprocess

import pytest
import yaml
from prometheus_client import generate_latest

from exporter import TrainingExporter
from exporter.stack.demo import SCENARIOS, train
from exporter.stack.servers import Prometheus, binary


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    """A real training run whose exporter a real Prometheus scrapes every second."""
    work = tmp_path_factory.mktemp("prometheus")
    exp = TrainingExporter(run="integration", port=0, addr="127.0.0.1", config={"lr": 2e-3})
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "training", "static_configs": [{"targets": [f"127.0.0.1:{exp.port}"]}]}],
    }))
    with Prometheus(config, work) as prom:
        prom.wait_ready()
        train(exp, SCENARIOS["healthy"], steps=300, eval_every=100, progress=None)
        exp.close()
        prom.wait_for('training_run_status{job="training",run="integration",status="completed"} == 1')
        yield exp, prom
    exp.close(stop_server=True)


def test_contract_series_read_back_through_prometheus(scraped_run):
    exp, prom = scraped_run
    st = exp.state
    expected = {
        'training_step': st.step,
        'training_epoch': st.epoch,
        'training_last_step_timestamp_seconds': st.last_step_time,
        'training_loss{split="train"}': st.losses["train"],
        'training_loss{split="val"}': st.losses["val"],
        'training_learning_rate{param_group="0"}': st.lrs["0"],
        'training_grad_norm': st.grad_norm,
        'training_eval_metric{split="val",metric="mae"}': st.eval_metrics[("val", "mae")],
        'training_samples_total': st.samples,
        'training_step_loss_count': st.loss_count,
    }
    for selector, want in expected.items():
        sel = selector if "{" in selector else selector + "{}"
        sel = sel.replace("{", '{job="training",run="integration",rank="0",', 1).replace(",}", "}")
        result = prom.query(sel)
        assert len(result) == 1, (sel, result)
        assert result[0]["value"] == pytest.approx(want, rel=1e-9), sel
        assert result[0]["metric"]["run"] == "integration"
        assert result[0]["metric"]["rank"] == "0"
    assert st.step == 300
    assert st.samples == 300 * 64


def test_mean_loss_between_scrapes_is_exact_in_promql(scraped_run):
    exp, prom = scraped_run
    result = prom.query('training_step_loss_sum{run="integration"} / training_step_loss_count{run="integration"}')
    assert result[0]["value"] == pytest.approx(exp.state.loss_sum / exp.state.loss_count, rel=1e-9)


def test_promtool_check_metrics_finds_no_problem(scraped_run):
    exp, _ = scraped_run
    exposition = generate_latest(exp.registry)
    check = subprocess.run([binary("promtool"), "check", "metrics"], input=exposition, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == b"" and check.stderr.strip() == b"", check.stdout + check.stderr
