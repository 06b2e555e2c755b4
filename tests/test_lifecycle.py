"""The run's lifecycle in the training process: phases, the status a `with` block ends with, and SIGTERM with
the handlers a process already has (the default one, torchrun's, a scheduler tool's), in real processes."""
import contextlib
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from exporter import TrainingExporter
from exporter.lifecycle import MAX_PHASES

from conftest import value


def phase_of(registry, run="test-run"):
    """(phase, start time) of the one phase series the exporter serves."""
    samples = [s for m in registry.collect() if m.name == "training_phase_start_timestamp_seconds"
               for s in m.samples if s.labels["run"] == run]
    assert len(samples) == 1, samples
    return samples[0].labels["phase"], samples[0].value


# ------------------------------------------------------------------------------------------------- phases
def test_startup_until_the_first_step_then_train(make_exporter, registry):
    before = time.time()
    exp = make_exporter()
    phase, since = phase_of(registry)
    assert phase == "startup" and before <= since <= time.time()
    exp.log_step(loss=1.0)
    phase, trained = phase_of(registry)
    assert phase == "train" and trained >= since
    exp.log_step(loss=1.0)
    assert phase_of(registry) == ("train", trained)  # a step is not a new phase


def test_phase_block_marks_the_phase_and_restores_the_one_before(make_exporter, registry):
    exp = make_exporter()
    exp.log_step(loss=1.0)
    with exp.phase("checkpoint"):
        phase, saving = phase_of(registry)
        assert phase == "checkpoint"
        with exp.phase("eval"):
            assert phase_of(registry)[0] == "eval"
        assert phase_of(registry)[0] == "checkpoint"
    phase, back = phase_of(registry)
    assert phase == "train" and back >= saving  # the train clock starts again after the save
    exp.phase("eval")  # without `with`: until the next phase() call
    exp.log_step(loss=1.0)
    assert phase_of(registry)[0] == "eval"


def test_phase_before_the_first_step_returns_to_startup(make_exporter, registry):
    exp = make_exporter()
    with exp.phase("data_loading"):
        assert phase_of(registry)[0] == "data_loading"
    assert phase_of(registry)[0] == "startup"


def test_phase_names_are_checked_and_bounded(make_exporter, registry, caplog):
    exp = make_exporter()
    for bad in ("", "Eval", "eval step", "x" * 40, 3):
        with pytest.raises(ValueError, match="phase"):
            exp.phase(bad)
    for i in range(MAX_PHASES - 2):  # startup and train are known from the start
        exp.phase(f"p{i}")
    assert value(registry, "training_exporter_dropped_total", kind="phase") == 0
    exp.phase("one_too_many")
    assert phase_of(registry)[0] == "other"
    assert "one_too_many" in caplog.text
    exp.phase("p0")  # a known name is never dropped
    exp.phase("two_too_many")
    assert value(registry, "training_exporter_dropped_total", kind="phase") == 2
    exp.close()
    with exp.phase("eval"):  # after close(): a no-op, warned about, never an error in the training loop
        pass
    assert phase_of(registry)[0] == "other"
    assert "phase() called after close()" in caplog.text


# -------------------------------------------------------------------------------------------- exit status
@pytest.mark.parametrize("body, status", [
    ("sys.exit(0)", "completed"), ("sys.exit()", "completed"), ("sys.exit(2)", "failed"),
    ("sys.exit('cannot load the data')", "failed"), ("raise KeyboardInterrupt", "interrupted"),
    ("raise RuntimeError('CUDA out of memory')", "failed"), ("pass", "completed")])
def test_with_block_ends_with_the_status_of_how_it_was_left(registry, body, status):
    try:
        with TrainingExporter(run="test-run", port=0, addr="127.0.0.1", registry=registry) as exp:
            exec(body)
    except (SystemExit, KeyboardInterrupt, RuntimeError):
        pass
    finally:
        exp.close(stop_server=True)
    assert value(registry, "training_run_status", status=status) == 1
    assert value(registry, "training_run_status", status="running") == 0


# ------------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_handler_is_optional_and_removed_by_close(make_exporter):
    before = signal.getsignal(signal.SIGTERM)
    make_exporter(handle_sigterm=False)
    assert signal.getsignal(signal.SIGTERM) is before
    exp = make_exporter()
    assert signal.getsignal(signal.SIGTERM) is not before
    exp.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_handler_from_a_thread_other_than_main(make_exporter):
    before = signal.getsignal(signal.SIGTERM)
    made = []
    thread = threading.Thread(target=lambda: made.append(make_exporter()))
    thread.start()
    thread.join(timeout=60)
    assert made and signal.getsignal(signal.SIGTERM) is before


PROGRAM = """
import logging, signal, sys, threading, time
from exporter import TrainingExporter
logging.basicConfig(level=logging.WARNING, format="%(message)s")
stop = threading.Event()
{before}
exp = TrainingExporter(run="preempted", port=0, addr="127.0.0.1")
try:
    with exp:
        print("port", exp.port, flush=True)
        while not stop.is_set():
            exp.log_step(loss=1.0)
            time.sleep({pause})
        print("loop ended", flush=True)
        sys.stdin.read()
{after}
"""


def start(before="", after="", pause=0.01):
    code = PROGRAM.format(before=textwrap.dedent(before), after=textwrap.dedent(after), pause=pause)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["port"], proc.communicate(timeout=60)
    return proc, int(line[1])


def scrape(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_sigterm_with_the_default_handler_publishes_interrupted_then_ends_the_process():
    """The default action ends the process without atexit: the exporter waits for one scrape of "interrupted"
    first, so Prometheus learns that the run ended and no target-down alert fires for a preempted job."""
    proc, port = start(after="finally:\n    print('not reached', flush=True)\n")
    seen = []
    try:
        assert 'status="running"} 1.0' in scrape(port)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # a scrape interval later, as Prometheus would come
        seen.append(scrape(port))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert 'status="interrupted"} 1.0' in seen[0]
    assert proc.returncode == -signal.SIGTERM, err  # the default action still ends the process
    assert "not reached" not in out
    assert "run 'preempted' rank 0 published status 'interrupted'" in err


def test_sigterm_runs_the_previous_python_handler_and_training_may_go_on():
    """As a scheduler tool's handler (checkpoint and requeue) does: it runs, the loop ends when it chooses, the
    exporter serves "interrupted" meanwhile and the run ends interrupted, not completed."""
    proc, port = start(before="""
        def requeue(signum, frame):
            print("previous handler ran", flush=True)
            stop.set()
        signal.signal(signal.SIGTERM, requeue)
        """, after="""
        finally:
            print("final", exp.state.status, flush=True)
        """)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "previous handler ran"
        assert proc.stdout.readline().strip() == "loop ended"
        body = scrape(port)
        assert 'training_run_status{rank="0",run="preempted",status="interrupted"} 1.0' in body
        assert 'training_run_status{rank="0",run="preempted",status="running"} 0.0' in body
        out, err = proc.communicate("", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "final interrupted", out + err


def test_sigterm_with_a_python_handler_that_returns_freezes_the_run_as_interrupted():
    """A handler that only takes note (the loop goes on to a checkpoint of its own choosing): the run ended at
    the signal, so the steps the loop still logs change neither the step counter nor the status."""
    proc, port = start(before="""
        def note(signum, frame):
            print("previous handler ran", flush=True)
        signal.signal(signal.SIGTERM, note)
        threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
        """, after="""
        finally:
            print("final", exp.state.status, exp.state.step, flush=True)
        """)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "previous handler ran"
        first = scrape(port)
        time.sleep(0.5)  # about 50 more iterations of the loop
        later = scrape(port)
        out, err = proc.communicate("stop\n", timeout=60)
    finally:
        proc.kill()
    step = re.search(r'training_step\{rank="0",run="preempted"\} (\S+)', first).group(1)
    assert f'training_step{{rank="0",run="preempted"}} {step}' in later
    for body in (first, later):
        assert 'training_run_status{rank="0",run="preempted",status="interrupted"} 1.0' in body
    assert proc.returncode == 0, err
    assert "log_step() called after close()" in err  # the loop did go on logging
    assert out.splitlines()[-1] == f"final interrupted {int(float(step))}", out + err


@pytest.mark.parametrize("pause", [0.01, 0], ids=["sleeping-loop", "busy-loop"])
def test_sigterm_with_torchruns_handler_raises_its_exception_and_publishes_interrupted(pause):
    """torchrun's agent installs a handler that raises SignalException in the main thread; it still does, and
    the `with` block it leaves ends "interrupted", not "failed". In a loop that never sleeps the signal lands
    inside the exporter's own code, which must pass the exception on, not count it as a fault of its own."""
    proc, port = start(pause=pause, before="""
        from torch.distributed.elastic.multiprocessing.api import SignalException, _terminate_process_handler
        signal.signal(signal.SIGTERM, _terminate_process_handler)
        """, after="""
        except SignalException as exc:
            print("raised", type(exc).__name__, exc.sigval.name, flush=True)
        print("final", exp.state.status, flush=True)
        """)
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines()[-2:] == ["raised SignalException SIGTERM", "final interrupted"], out + err


# A SIGTERM that lands while the training thread holds the exporter's lock: each trap below delivers the signal to
# its own process from code the exporter runs inside its locked region, so the timing is exact.
TRAPPED = """
import logging, signal, sys, torch
from exporter import TrainingExporter
logging.basicConfig(level=logging.WARNING, format="%(message)s")
sprung = []

def spring():
    if not sprung:
        sprung.append(True)
        signal.raise_signal(signal.SIGTERM)

class Loss(torch.Tensor):
    '''A loss that delivers SIGTERM at the first torch function the exporter calls on it inside its lock.'''
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if exp.state.lock._main_depth:
            spring()
        return super().__torch_function__(func, types, args, kwargs or {{}})

class Name(str):
    '''A phase name whose hash (taken inside phase()'s lock) delivers SIGTERM.'''
    def __hash__(self):
        spring()
        return str.__hash__(self)

class Scaler:
    '''A gradient scaler whose state, read by the exporter's update hook inside its lock, delivers SIGTERM.'''
    def update(self):
        pass
    @property
    def _per_optimizer_states(self):
        spring()
        return {{}}

{before}
model = torch.nn.Linear(2, 1)
scaler = Scaler()
with TrainingExporter(run="trapped", port=0, addr="127.0.0.1") as exp:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    exp.watch(model, opt, scaler=scaler)
    exp.log_step(loss=1.0)
    print("port", exp.port, flush=True)
    sys.stdin.readline()
    {trap}
    print("not reached", flush=True)
"""
TRAPS = {"log_step": "exp.log_step(loss=torch.tensor(2.0).as_subclass(Loss))",
         "log_eval": "exp.log_eval('val', loss=torch.tensor(0.5).as_subclass(Loss))",
         "phase": "exp.phase(Name('eval'))",
         "hook": "scaler.update()"}
# A loop that spends most of its time inside the exporter: its step hooks, log_step, log_eval and phase.
BUSY = ("while True: model(torch.ones(1, 2)).sum().backward(); opt.step(); opt.zero_grad(); "
        "exp.log_step(loss=torch.tensor(1.0)); exp.log_eval('val', loss=0.5); exp.phase('eval'); exp.phase('train')")
EXIT_3 = """
def previous(signum, frame):
    print("previous handler ran", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, previous)
"""


class Scraper(threading.Thread):
    """Scrapes like an impatient Prometheus (every 0.1 s, 2 s timeout) and notes when it first saw each status."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.first, self.stop = port, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                status = re.search(r'training_run_status\{[^}]*status="(\w+)"\} 1\.0',
                                   urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2)
                                   .read().decode()).group(1)
                self.first.setdefault(status, time.monotonic())
            except OSError:
                pass
            time.sleep(0.1)


@contextlib.contextmanager
def _scraped_child(code: str):
    """A child process running ``code`` (it prints its port, then waits for "go" on stdin) and a Scraper on it;
    both stopped on leaving."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    scraper = None
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["port"], proc.communicate(timeout=60)
        scraper = Scraper(int(line[1]))
        scraper.start()
        yield proc, scraper
    finally:
        proc.kill()
        if scraper is not None:
            scraper.stop.set()


@pytest.mark.parametrize("where,before,code", [(where, "", -signal.SIGTERM) for where in TRAPS]
                         + [("log_step", EXIT_3, 3)],
                         ids=[f"{where}-default-handler" for where in TRAPS] + ["log_step-python-handler"])
def test_sigterm_inside_the_exporters_lock_still_serves_interrupted(where, before, code):
    """The handler must not close the run halfway through an update, nor wait for the final scrape while the
    lock that scrape renders under is held: the scraper sees "interrupted" within a few seconds (not after
    close_timeout, 10 s, when the process dies unscraped), then the previous handler ends the process."""
    with _scraped_child(TRAPPED.format(before=before, trap=TRAPS[where])) as (proc, scraper):
        while "running" not in scraper.first and proc.poll() is None:
            time.sleep(0.05)
        sent = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    assert "interrupted" in scraper.first, err
    assert scraper.first["interrupted"] - sent < 4, err
    assert proc.returncode == code, err
    assert "not reached" not in out
    assert ("previous handler ran" in out) == (code == 3)
    assert "run 'trapped' rank 0 published status 'interrupted'" in err


def test_sigterm_at_random_points_of_a_busy_loop_is_always_served_interrupted():
    """The signal at a random moment of a loop that spends most of its time inside the exporter (F4 of the user
    trial: one try in six deadlocked): every try serves "interrupted" and ends as the default handler does."""
    rng = random.Random(4)
    for attempt in range(5):
        with _scraped_child(TRAPPED.format(before="", trap=BUSY)) as (proc, scraper):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            time.sleep(rng.uniform(0.3, 0.8))
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert scraper.first.get("interrupted", float("inf")) - sent < 4, (attempt, err)
        assert proc.returncode == -signal.SIGTERM, (attempt, err)


def test_exporters_of_one_process_wait_for_their_final_scrapes_together():
    """Three runs of a sweep closed, none scraped: the process waits the longest close_timeout once, not one
    close_timeout after another."""
    code = ("import time\nfrom exporter import TrainingExporter\n"
            "runs = [TrainingExporter(run=f'r{i}', port=0, addr='127.0.0.1', close_timeout=4, handle_sigterm=False)"
            " for i in range(3)]\n"
            "[r.close() for r in runs]\nprint('closed', time.monotonic(), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        closed = time.monotonic()
        assert proc.wait(timeout=60) == 0
        waited = time.monotonic() - closed
    finally:
        proc.kill()
    assert 3.9 <= waited < 9  # one after another would be 12 s


WORKER = """
import logging, sys, time
from exporter import TrainingExporter
logging.basicConfig(level=logging.WARNING, format="%(message)s")
with TrainingExporter(port=0, addr="127.0.0.1") as exp:
    print("ready", exp.rank, flush=True)
    while True:
        exp.log_step(loss=1.0)
        time.sleep(0.01)
"""


def test_torchrun_stopping_its_workers_reaches_every_rank(tmp_path):
    """Real torchrun, two workers: SIGTERM to torchrun makes its handler stop the workers with SIGTERM; each
    rank publishes "interrupted" and ends as the default handler ends it."""
    script = tmp_path / "train.py"
    script.write_text(WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = sorted(proc.stdout.readline().strip() for _ in range(2))
        assert ready == ["ready 0", "ready 1"], proc.communicate(timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # torchrun's own handler ran: it stopped the workers and raised its exception, as without the exporter.
    assert "shutting down workers" in err and "SignalException" in err and proc.returncode == 1, err
    published = re.findall(r"run '([^']+)' rank (\d) published status 'interrupted'", err)
    assert sorted(rank for _, rank in published) == ["0", "1"], err
    assert len({run for run, _ in published}) == 1  # both ranks under torchrun's one run id


# ------------------------------------------------------------------------------------------- port takeover
COMPLETED = re.compile(r'training_run_status\{rank="0",run="(sweep-\d+)",status="completed"\} 1\.0')


def test_port_takeover_under_continuous_scrapes_serves_every_closed_runs_final_state():
    """A sweep in one process: each run closes and the next takes its port over while scrapes are in flight
    (as Prometheus's would be). Every run's "completed" must reach a scraper: a scrape that began before a run
    closed carries its state from before, and must not count as the final scrape that retires it."""
    from prometheus_client import CollectorRegistry

    runs, seen, stop = 40, set(), threading.Event()
    first = TrainingExporter(run="sweep-0", port=0, addr="127.0.0.1", registry=CollectorRegistry(),
                             close_timeout=0, handle_sigterm=False)
    port, exporters = first.port, [first]

    def scraper():
        while not stop.is_set():
            try:
                seen.update(COMPLETED.findall(scrape(port)))
            except OSError:
                pass

    threads = [threading.Thread(target=scraper, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(runs):
            exp = exporters[-1]
            for _ in range(20):
                exp.log_step(loss=1.0)
            time.sleep(0.01)
            exp.close()
            if i + 1 < runs:
                exporters.append(TrainingExporter(run=f"sweep-{i + 1}", port=port, addr="127.0.0.1",
                                                  registry=CollectorRegistry(), close_timeout=0,
                                                  handle_sigterm=False))
        deadline = time.monotonic() + 10
        while len(seen) < runs and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for exp in exporters:
            exp.close(stop_server=True)
    assert sorted(set(f"sweep-{i}" for i in range(runs)) - seen) == []
