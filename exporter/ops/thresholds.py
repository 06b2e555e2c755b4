"""The thresholds file: every threshold, window and ``for:`` of the rules, read and checked in one place."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Mapping

import yaml

# The shipped thresholds file is the schema: its keys are the known keys, its values tell their kinds. Keys added
# to it are known at once, with no second list to keep in step.
SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "thresholds.yaml"
_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
_UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


class ThresholdsError(ValueError):
    """The thresholds file is missing a key or has a bad value; the message names it."""


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as ``90s``, ``10m`` or ``1h30m``."""
    m = _DURATION.match(str(text))
    if not text or m is None or not any(m.groups()):
        raise ValueError(f"{text!r} is not a Prometheus duration (such as 30s, 10m, 1h)")
    return sum(int(m.group(2 * i + 2)) * unit for i, unit in enumerate(_UNIT_SECONDS) if m.group(2 * i + 2))


class Thresholds:
    """A validated thresholds file; ``get("alerts.TrainingHung.floor")`` returns a checked value."""

    def __init__(self, data: Mapping[str, Any], source: str = "thresholds") -> None:
        if not isinstance(data, Mapping):
            raise ThresholdsError(f"{source}: expected a mapping at the top level")
        self.data = data
        self.source = source

    @classmethod
    def load(cls, path: Path) -> "Thresholds":
        """Read a thresholds file; one with ``extends: OTHER`` overrides only the keys it lists of OTHER
        (a path relative to it)."""
        path = Path(path)
        data = _read(path)
        if isinstance(data, Mapping) and "extends" in data:
            base = cls.load(path.parent / data["extends"]).data
            data = _merge(base, {k: v for k, v in data.items() if k != "extends"})
        if not isinstance(data, Mapping):
            raise ThresholdsError(f"{path}: expected a mapping at the top level")
        if SHIPPED.exists():
            check_schema(data, _read(SHIPPED), str(path))
        return cls(data, str(path))

    def get(self, key: str) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ThresholdsError(f"{self.source}: missing key {key!r}")
            node = node[part]
        return node

    def duration(self, key: str) -> str:
        value = self.get(key)
        try:
            duration_seconds(value)
        except ValueError as exc:
            raise ThresholdsError(f"{self.source}: {key}: {exc}") from None
        return str(value)

    def seconds(self, key: str) -> float:
        return duration_seconds(self.duration(key))

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ThresholdsError(f"{self.source}: {key} must be a positive number, got {value!r}")
        return float(value)

    @property
    def identity(self) -> str:
        """The labels that identify one run, as a PromQL label list (``cluster, namespace, job, run``)."""
        labels = self.get("identity_labels")
        if (not isinstance(labels, list) or not labels or "run" not in labels
                or not all(isinstance(x, str) and x.isidentifier() for x in labels)):
            raise ThresholdsError(f"{self.source}: identity_labels must be a list of label names that includes "
                                  f"'run', got {labels!r}")
        return ", ".join(labels)

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            raise ThresholdsError(f"{self.source}: {key} must be a non-empty string, got {value!r}")
        return value


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged


def _read(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ThresholdsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise ThresholdsError(f"{path}: cannot read: {exc.strerror}") from None


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "section"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "positive number" if value > 0 else "number >= 0"
    if isinstance(value, list):
        return "list of names" if value and all(isinstance(x, str) for x in value) else "list"
    if isinstance(value, str):
        try:
            duration_seconds(value)
            return "duration"
        except ValueError:
            return "non-empty string"
    return "any"


# Sections whose keys are the user's own names (phases a loop marks with ``exp.phase(...)``): any key is known,
# none is required, and every value has the kind of the shipped ones.
OPEN_SECTIONS = ("alerts.TrainingHung.phases",)


def check_schema(data: Mapping[str, Any], schema: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Raise ``ThresholdsError`` naming the first key of ``data`` that ``schema`` (the shipped file) does not
    know, that is missing, or whose value is not of the kind the shipped value has."""
    if prefix.rstrip(".") in OPEN_SECTIONS and schema:
        example = next(iter(schema.values()))
        schema = {key: example for key in data}
    for key in data:
        if key not in schema:
            known = ", ".join(str(k) for k in schema)
            raise ThresholdsError(f"{source}: unknown key {prefix + str(key)!r} (known here: {known})")
    for key, expected in schema.items():
        name = prefix + str(key)
        if key not in data:
            raise ThresholdsError(f"{source}: missing key {name!r}")
        value, kind = data[key], _kind(expected)
        if kind == "section":
            if not isinstance(value, Mapping):
                raise ThresholdsError(f"{source}: {name} must be a section (a mapping of keys), got {value!r}")
            check_schema(value, expected, source, name + ".")
        elif kind == "duration":
            try:
                duration_seconds(value)
            except ValueError as exc:
                raise ThresholdsError(f"{source}: {name}: {exc}") from None
        elif kind.endswith("number"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0 or (
                    kind == "positive number" and value == 0):
                raise ThresholdsError(f"{source}: {name} must be a {kind}, got {value!r}")
        elif kind == "boolean" and not isinstance(value, bool):
            raise ThresholdsError(f"{source}: {name} must be true or false, got {value!r}")
        elif kind == "non-empty string" and (not isinstance(value, str) or not value):
            raise ThresholdsError(f"{source}: {name} must be a non-empty string, got {value!r}")
        elif kind == "list" and not isinstance(value, list):
            raise ThresholdsError(f"{source}: {name} must be a list, got {value!r}")
        elif kind == "list of names" and (not isinstance(value, list) or not all(isinstance(x, str) and x
                                                                               for x in value)):
            raise ThresholdsError(f"{source}: {name} must be a list of names, got {value!r}")
