"""Alertmanager routing derived from the thresholds file, and the checks of a configuration against it.

``deploy/alertmanager/alertmanager.yml`` is written by hand (its receivers are a site's own), but its ``route``
and ``inhibit_rules`` must be exactly ``routing(thresholds)``: grouping and every inhibition's ``equal`` follow
the identity labels the rules aggregate by, and the per-run kinds that a fleet alert replaces wait the fleet
window. ``problems()`` says where a configuration differs and which secret files it references are missing;
``python -m exporter check-alertmanager`` runs it before Alertmanager starts, since Alertmanager itself starts
and passes ``amtool check-config`` with a missing secret file, then fails every send.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import yaml

from .fleet_rules import FLEET, scope_labels
from .thresholds import Thresholds

# Receivers the routing sends to; the configuration defines what each notifies.
CATCH_ALL = "training-unrouted"
SEVERITY_RECEIVERS = (("critical", "training-critical"), ("warning", "training-warning"), ("info", "training-quiet"))
WATCHDOG = "watchdog"
PIPELINE = "alerting-health"

# (source alerts, target alerts): the source explains the target of the same run, so only the source notifies.
RUN_INHIBITIONS = (
    # A NaN explains the spike, explosion and divergence of the same run.
    ("TrainingLossNotFinite", "TrainingLossSpike|TrainingGradientExplosion|TrainingDiverging"),
    # A diverging run spikes and explodes on its way up: one page, the divergence.
    ("TrainingDiverging", "TrainingLossSpike|TrainingGradientExplosion"),
    # A hung or unreachable job is flat because it does not train.
    ("TrainingHung|TrainingTargetDown", "TrainingPlateau|TrainingLossDecreasingSlowly"),
)


def _matcher(alertnames: str) -> str:
    return f'alertname=~"{alertnames}"' if "|" in alertnames else f'alertname="{alertnames}"'


# The route of the per-run kinds that a fleet alert replaces.
FLEET_KINDS = _matcher("|".join(FLEET))


def _severity_routes() -> List[Dict[str, Any]]:
    return [{"matchers": [f'severity="{severity}"'], "receiver": receiver} for severity, receiver in SEVERITY_RECEIVERS]


def routing(t: Thresholds) -> Dict[str, Any]:
    """The ``route`` and ``inhibit_rules`` of the Alertmanager configuration for the thresholds file ``t``."""
    identity = [label.strip() for label in t.identity.split(",")]
    scope = scope_labels(t)
    route = {
        # Not a silent receiver: an alert without a known severity still reaches someone.
        "receiver": CATCH_ALL,
        # One notification per alert and run (a 64-rank job is one run; one name in two clusters is two runs).
        "group_by": ["alertname", *identity],
        "group_wait": "30s",
        "group_interval": "5m",
        "repeat_interval": "4h",
        "routes": [
            # The dead man's switch expects the Watchdog every minute; its silence is the alert.
            {"matchers": [_matcher("Watchdog")], "receiver": WATCHDOG, "group_wait": "0s",
             "group_interval": "1m", "repeat_interval": "1m"},
            # Failed deliveries go to a receiver of their own, not to the one that fails.
            {"matchers": [_matcher("AlertmanagerNotificationsFailing")], "receiver": PIPELINE,
             "group_by": ["alertname", "instance", "integration"]},
            # Kinds a fleet alert replaces wait the fleet window, so that the fleet alert of their scope can
            # inhibit them before they notify.
            {"matchers": [FLEET_KINDS], "group_wait": t.duration("alerting.fleet_window"),
             "routes": _severity_routes()},
            *_severity_routes(),
        ],
    }
    inhibit = [{"source_matchers": [_matcher(source)], "target_matchers": [_matcher(target)], "equal": list(identity)}
               for source, target in RUN_INHIBITIONS]
    inhibit += [{"source_matchers": [_matcher(fleet)], "target_matchers": [_matcher(per_run)], "equal": list(scope)}
                for per_run, (fleet, _) in FLEET.items()]
    return {"route": route, "inhibit_rules": inhibit}


def secret_files(config: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(where, path) of every file the configuration reads a secret from (``api_url_file``, ``password_file``,
    ``credentials_file``, ...)."""
    def walk(node: Any, where: str) -> Iterator[Tuple[str, str]]:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
                    yield f"{where}.{key}", value
                else:
                    yield from walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                name = item.get("name") if isinstance(item, Mapping) else None
                yield from walk(item, f"{where}[{name or i}]")

    return list(walk(config, "config"))


def host_path(path: str, base: Path, mounts: Sequence[Tuple[str, Path]]) -> Path:
    """Where ``path`` of the configuration lies on this machine: under a mount (container dir -> local dir), or
    relative to the configuration's folder."""
    for inside, outside in mounts:
        if path == inside or path.startswith(inside.rstrip("/") + "/"):
            return outside / path[len(inside.rstrip("/")):].lstrip("/")
    return base / path


def problems(config_path: Path, t: Thresholds, mounts: Sequence[Tuple[str, Path]] = ()) -> List[str]:
    """What is wrong with the configuration at ``config_path``: routing that differs from ``routing(t)``,
    secret files missing or empty. Empty when it is ready to start."""
    config = yaml.safe_load(Path(config_path).read_text())
    out = []
    for key, want in routing(t).items():
        if config.get(key) != want:
            out.append(f"{key} differs from what {t.source} gives (identity labels {t.identity}); expected:\n"
                       + yaml.safe_dump({key: want}, sort_keys=False, width=120))
    where_used: Dict[str, List[str]] = {}
    for where, path in secret_files(config):
        where_used.setdefault(path, []).append(where)
    for path, where in where_used.items():
        local = host_path(path, Path(config_path).parent, mounts)
        if not local.is_file() or local.stat().st_size == 0:
            out.append(f"secret file {path} is missing or empty (looked at {local}); every send of "
                       f"{', '.join(where)} would fail")
    return out


def main(config_path: Path, thresholds: Path, mounts: Sequence[str] = ()) -> int:
    """The start-up check of ``python -m exporter check-alertmanager``: 0 when ready, 1 with the problems."""
    pairs = []
    for mount in mounts:
        inside, sep, outside = mount.partition("=")
        if not sep or not inside.startswith("/"):
            raise ValueError(f"--mount {mount!r}: expected CONTAINER_DIR=LOCAL_DIR, such as "
                             f"/etc/alertmanager=deploy/alertmanager")
        pairs.append((inside, Path(outside)))
    found = problems(config_path, Thresholds.load(thresholds), pairs)
    for problem in found:
        print(f"{config_path}: {problem}")
    if not found:
        secrets = sorted({path for _, path in secret_files(yaml.safe_load(Path(config_path).read_text()))})
        print(f"{config_path}: routing follows {thresholds}; {len(secrets)} secret file(s) present"
              + "".join(f"\n  {s}" for s in secrets))
    return 1 if found else 0
