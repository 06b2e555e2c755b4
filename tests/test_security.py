"""Nothing exposed: TLS, client certificates and basic auth from a web-config.yml; credentials redacted; label
values bounded; forked children without the socket; port 0 on every rank; the port handed over after close()."""
import base64
import multiprocessing
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from exporter import TrainingExporter, labels, runtime
from tests.conftest import value

bcrypt = pytest.importorskip("bcrypt")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate from that CA and one from another CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ca, ext in (("server", "ca", ["-extfile", "san.cnf"]), ("client", "ca", []),
                          ("stranger", "other-ca", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.crt", *ext, cwd=d)
    return d


def _web_config(d, text):
    path = d / "web-config.yml"
    path.write_text(text)
    return str(path)


def _get(url, context=None, auth=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return response.status, response.read().decode()


def _client_context(pki, cert=None):
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        context.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return context


def test_tls_serves_metrics_only_over_tls(make_exporter, pki):
    exp = make_exporter(web_config=_web_config(pki, "tls_server_config:\n  cert_file: server.crt\n"
                                                    "  key_file: server.key\n"))
    status, body = _get(f"https://127.0.0.1:{exp.port}/metrics", _client_context(pki))
    assert status == 200 and 'training_step{rank="0",run="test-run"}' in body
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _get(f"http://127.0.0.1:{exp.port}/metrics")
    # Still served over TLS after a plain-text client failed its handshake.
    assert _get(f"https://127.0.0.1:{exp.port}/metrics", _client_context(pki))[0] == 200


def test_client_certificate_required_and_verified(make_exporter, pki):
    exp = make_exporter(web_config=_web_config(pki, "tls_server_config:\n  cert_file: server.crt\n"
                                                    "  key_file: server.key\n  client_ca_file: ca.crt\n"
                                                    "  client_auth_type: RequireAndVerifyClientCert\n"))
    url = f"https://127.0.0.1:{exp.port}/metrics"
    assert _get(url, _client_context(pki, "client"))[0] == 200
    for refused in (None, "stranger"):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(url, _client_context(pki, refused))


def test_basic_auth_with_bcrypt_hashes(make_exporter, tmp_path):
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    exp = make_exporter(web_config=_web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n"
                                                         "http_server_config:\n  headers:\n"
                                                         "    X-Content-Type-Options: nosniff\n"))
    url = f"http://127.0.0.1:{exp.port}/metrics"
    for auth in (None, ("prometheus", "wrong"), ("someone", "s3cret")):
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(url, auth=auth)
        assert err.value.code == 401 and err.value.headers["WWW-Authenticate"].startswith("Basic")
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(
            b"prometheus:s3cret").decode()}), timeout=10) as response:
        assert response.status == 200 and response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("text, named", [
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "tls_server_config"),
    ("tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "tls_server_config.cipher_suites"),
    ("rate_limit:\n  burst: 20\n", "rate_limit"),
    ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Sometimes\n", "tls_server_config"),
])
def test_bad_web_config_is_refused_at_start_naming_the_key(make_exporter, tmp_path, text, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        make_exporter(web_config=_web_config(tmp_path, text))


def test_web_config_from_environment(monkeypatch, tmp_path):
    path = _web_config(tmp_path, "basic_auth_users: {}\n")
    monkeypatch.setenv("TRAINING_EXPORTER_WEB_CONFIG", path)
    assert runtime.resolve_web_config(None) == path
    assert runtime.resolve_web_config("other.yml") == "other.yml"


def test_credentials_in_config_are_redacted(make_exporter, registry):
    config = {"lr": 3e-4, "api_token": "tok-123", "wandb": {"api_key": "k-456"}, "dbPassword": "pw",
              "max_tokens": 2048, "num_keys": 4, "author": "me", "hf_token": "hf_789", "s3_secret": "s"}
    make_exporter(config=config, config_allow=["num_*", "hf_token"], config_deny=["author"])
    info = {s.name: s for s in registry.collect() if s.name == "training_run_info"}["training_run_info"].samples[0]
    published = info.labels
    assert published["config_lr"] == "0.0003" and published["config_max_tokens"] == "2048"
    assert published["config_num_keys"] == "4"
    assert published["config_hf_token"] == "hf_789"  # allowed explicitly
    for key in ("config_api_token", "config_wandb_api_key", "config_db_password", "config_s3_secret", "config_author"):
        assert published[key] == labels.REDACTED, key


def test_passwords_inside_urls_are_redacted_whatever_the_key(make_exporter, registry):
    make_exporter(config={"db_url": "postgresql://admin:hunter2@db:5432/x", "broker": "redis://:pw@cache:6379/0",
                          "data": "s3://bucket/train", "endpoint": "http://host:8080/v1"})
    info = next(s for s in registry.collect() if s.name == "training_run_info").samples[0].labels
    assert info["config_db_url"] == f"postgresql://admin:{labels.REDACTED}@db:5432/x"
    assert info["config_broker"] == f"redis://:{labels.REDACTED}@cache:6379/0"
    assert info["config_data"] == "s3://bucket/train" and info["config_endpoint"] == "http://host:8080/v1"


def test_no_secret_reaches_the_exposition(make_exporter):
    exp = make_exporter(config={"api_token": "tok-SECRET", "nested": {"client_secret": "SECRET2"}})
    body = _get(f"http://127.0.0.1:{exp.port}/metrics")[1]
    assert "SECRET" not in body and labels.REDACTED in body


@pytest.mark.parametrize("bad", [{"config_allow": "lr"}, {"config_deny": [3]}])
def test_allow_and_deny_must_be_lists_of_patterns(make_exporter, bad):
    with pytest.raises(TypeError, match=next(iter(bad))):
        make_exporter(**bad)


def test_every_user_label_value_is_bounded_and_counted(make_exporter, registry):
    import torch

    long = "x" * 5000
    exp = make_exporter(config={long: 1, "note": "y" * 5000})
    assert value(registry, "training_exporter_dropped_total", kind="config") == 2
    exp.log_eval(long, loss=1.0, metrics={long + "a": 0.5, long + "b": 0.25})
    assert value(registry, "training_exporter_dropped_total", kind="eval") == 3
    model = torch.nn.Sequential()
    model.add_module("z" * 5000, torch.nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    exp.watch(model, optimizer)
    assert value(registry, "training_exporter_dropped_total", kind="layer") == 1
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    exp.log_step(loss=1.0)
    exp.close()
    layers = [s.labels["layer"] for fam in registry.collect() if fam.name == "training_layer_grad_norm"
              for s in fam.samples]
    assert layers and all(layer.startswith("zzz") for layer in layers)  # the module's cut name, not "(root)"
    lengths = [len(v) for fam in registry.collect() for s in fam.samples for v in s.labels.values()]
    assert max(lengths) <= labels.MAX_VALUE
    evals = [s.labels["metric"] for fam in registry.collect() if fam.name == "training_eval_metric"
             for s in fam.samples]
    assert len(set(evals)) == 2  # cut names stay apart


def test_forked_child_does_not_keep_the_socket(make_exporter):
    """A DataLoader-style forked worker outlives the parent's server: the port must refuse, not hang."""
    exp = make_exporter()
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_linger, args=(ready, done))
    child.start()
    try:
        assert ready.wait(30)
        exp.close(stop_server=True)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", exp.port), timeout=5)
    finally:
        done.set()
        child.join(30)
    assert child.exitcode == 0


def _linger(ready, done):
    ready.set()
    done.wait(60)


def test_dataloader_workers_do_not_serve(make_exporter):
    import torch
    from torch.utils.data import DataLoader

    exp = make_exporter()
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True,
                        multiprocessing_context="fork")
    assert sum(int(b.sum()) for b in loader) == 28  # the workers are up
    exp.close(stop_server=True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", exp.port), timeout=5)
    del loader
    assert torch  # the import above is what the test exercises


def test_port_zero_stays_zero_on_every_local_rank():
    for local_rank in range(4):
        assert runtime.resolve_port(None, local_rank, {"TRAINING_EXPORTER_PORT": "0"}) == 0


def test_new_exporter_takes_over_the_port_and_serves_the_old_final_series_once(registry):
    from prometheus_client import CollectorRegistry

    first = TrainingExporter(run="sweep-1", port=0, addr="127.0.0.1", registry=registry, close_timeout=0)
    port = first.port
    first.log_step(loss=1.0)
    first.close("completed")
    second = TrainingExporter(run="sweep-2", port=port, addr="127.0.0.1", registry=CollectorRegistry())
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        body = _get(url)[1]
        assert 'training_run_status{rank="0",run="sweep-1",status="completed"} 1.0' in body
        assert 'training_step{rank="0",run="sweep-2"}' in body
        assert body.count("# TYPE training_step gauge") == 1  # one family, two runs
        # Dropped once a response carrying it went out whole (the bookkeeping follows the write by microseconds).
        deadline = time.monotonic() + 5
        while 'run="sweep-1"' in _get(url)[1]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert 'run="sweep-2"' in _get(url)[1]
        with pytest.raises(OSError, match="already in use"):
            TrainingExporter(run="sweep-3", port=port, addr="127.0.0.1", registry=CollectorRegistry())
    finally:
        second.close(stop_server=True)
        first.close(stop_server=True)


def test_final_scrape_wait_is_bounded_and_returns_at_once_after_a_scrape(make_exporter):
    exp = make_exporter(close_timeout=1.0)
    exp.close()
    started = time.monotonic()
    assert exp._server.wait_final_scrape(1.0) is False
    assert 0.9 <= time.monotonic() - started < 5
    _get(f"http://127.0.0.1:{exp.port}/metrics")
    started = time.monotonic()
    assert exp._server.wait_final_scrape(30.0) is True
    assert time.monotonic() - started < 1


def test_process_exit_waits_for_the_final_scrape_then_exits(tmp_path):
    """At exit, the process waits up to close_timeout for Prometheus's scrape of the final state, and no more."""
    code = ("from exporter import TrainingExporter\n"
            "e = TrainingExporter(run='r', port=0, addr='127.0.0.1', close_timeout=60)\n"
            "print(e.port, flush=True); e.close(); print('closed', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        assert proc.stdout.readline().startswith("closed")
        time.sleep(1)
        assert proc.poll() is None  # waiting for the scrape
        assert 'status="completed"} 1.0' in _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_shipped_prometheus_scrape_settings_reach_a_tls_basic_auth_exporter(make_exporter, pki, tmp_path):
    """The commented TLS and basic-auth settings of prometheus.yml, uncommented, let a real Prometheus scrape an
    exporter that requires both; the same Prometheus without them cannot."""
    import re

    import yaml

    from exporter.stack.servers import DEPLOY, Prometheus, free_port

    hashed = bcrypt.hashpw(b"scrape-pw", bcrypt.gensalt(rounds=4)).decode()
    exp = make_exporter(web_config=_web_config(pki, "tls_server_config:\n  cert_file: server.crt\n"
                                                    "  key_file: server.key\n"
                                                    f"basic_auth_users:\n  prometheus: '{hashed}'\n"))
    shipped = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    enabled = re.sub(r"(?m)^    # ((scheme|tls_config|basic_auth):.*|  (ca_file|username|password_file):.*)$",
                     r"    \1", shipped)
    assert enabled != shipped
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "training-ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    (tmp_path / "secrets" / "training-password").write_text("scrape-pw")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "t.json").write_text(f'[{{"targets": ["127.0.0.1:{exp.port}"]}}]')
    for name, text in (("enabled", enabled), ("shipped", shipped)):
        config = yaml.safe_load(text)
        config["scrape_configs"] = [dict(j, scrape_interval="1s") for j in config["scrape_configs"]
                                    if j["job_name"] == "training"]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = Prometheus(tmp_path / "prometheus.yml", tmp_path / name, port=free_port())
        try:
            prometheus.wait_ready()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not prometheus.query('up{job="training"}'):
                time.sleep(0.5)
            up = prometheus.query('up{job="training"}')
            assert up and up[0]["value"] == (1.0 if name == "enabled" else 0.0), (name, up)
            if name == "enabled":
                assert prometheus.query('training_step{run="test-run"}')
        finally:
            prometheus.stop()
