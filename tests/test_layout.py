"""The package's split: the training-side library never imports the operator tooling or the local stack."""
import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "exporter"
OPERATOR_SIDE = ("ops", "stack")


def training_side_modules():
    return [p for p in PACKAGE.glob("*.py") if p.name != "__main__.py"]


def test_training_side_sources_import_nothing_from_the_operator_side():
    offenders = []
    for path in training_side_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                if any(target.lstrip(".").split(".")[0] in OPERATOR_SIDE or target.startswith(f"exporter.{side}")
                       for side in OPERATOR_SIDE) or (target == "." and set(names) & set(OPERATOR_SIDE)):
                    offenders.append(f"{path.name}: from {target} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names
                              if any(a.name.startswith(f"exporter.{side}") for side in OPERATOR_SIDE)]
    assert offenders == []


def test_importing_the_exporter_loads_no_operator_module():
    code = "import exporter, sys; print(' '.join(sorted(m for m in sys.modules if m.startswith('exporter'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "exporter.core" in loaded
    assert [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in OPERATOR_SIDE] == []


def test_the_simulated_clock_covers_every_training_side_module_that_reads_the_time():
    """The corpus generator replaces ``time`` in the modules that read the wall clock; a module that starts to
    read it must join that list, or its timestamps leave the simulated clock."""
    source = (PACKAGE / "ops" / "simulate.py").read_text()
    patched = set(re.search(r"modules = \(([^)]*)\)", source).group(1).replace(" ", "").split(","))
    readers = {p.stem for p in training_side_modules()
               if re.search(r"\btime\.(time|perf_counter)\(", p.read_text()) and p.stem != "server"}
    assert readers == patched
