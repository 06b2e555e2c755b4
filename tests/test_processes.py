"""Process hygiene: whatever ends the parent (Ctrl-C, SIGTERM, a closed terminal, SIGKILL), nothing it started
lingers: servers, demo trainers, the whole `python -m exporter stack`."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PARENT = """
import signal, sys, time
from pathlib import Path
from exporter.stack.servers import DemoRun, ManagedProcess, Pushgateway, free_port, stop_on_signals
# A parent in a terminal's foreground: Ctrl-C raises KeyboardInterrupt. A suite started in the background by a
# non-interactive shell (`make test &`) passes SIGINT on ignored, which Python then keeps ignoring.
signal.signal(signal.SIGINT, signal.default_int_handler)
work = Path(sys.argv[1])
children = []
with stop_on_signals():
    try:
        children.append(Pushgateway(work / "pushgateway"))
        children.append(DemoRun("healthy", "hygiene", free_port(), work, steps=100000, linger=3600))
        children.append(ManagedProcess(["sleep", "3600"], work / "sleep.log"))
        children[0].wait_ready()
        print(" ".join(str(c.proc.pid) for c in children), flush=True)
        time.sleep(3600)
    finally:
        for c in children:
            c.stop()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _children(pid: int):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_gone(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_children_end_with_their_parent(tmp_path, sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        assert _wait_gone(pids) == []
    finally:
        parent.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_demo_stack_ends_with_its_terminal(tmp_path):
    """`make demo` in a terminal that is closed (SIGHUP): Prometheus, Alertmanager, the Pushgateway and every
    trainer end too. (Every signal, SIGKILL included, is tested above with a smaller parent.)"""
    sig = signal.SIGHUP
    stack = subprocess.Popen([sys.executable, "-m", "exporter", "stack", "--workdir", str(tmp_path / "demo"),
                              "--steps", "100000", "--duration", "600"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith("Pushgateway") for line in lines):
            line = stack.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        pids = _children(stack.pid)
        assert len(pids) >= 12, lines  # nine trainers and three servers
        stack.send_signal(sig)
        out, _ = stack.communicate(timeout=60)
        assert _wait_gone(pids) == []
        assert "stopping (SIGHUP)" in out and "stopped every process" in out
    finally:
        stack.kill()
