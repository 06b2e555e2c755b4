"""Alerts about many runs at once and about the alerting pipeline itself: fleet-wide incidents (many runs of one
scope hung, vanished or non-finite together: one page, not one per run), the always-firing Watchdog of a
dead man's switch, and failed notifications."""
from __future__ import annotations

from typing import Dict, List

from .links import OVERVIEW_DASHBOARD
from .rules import Alert, num
from .thresholds import Thresholds, ThresholdsError

# Per-run alert -> the fleet alert raised when many runs of one scope fire it; Alertmanager's routing holds the
# per-run notifications back for the fleet window and lets the fleet alert inhibit them (exporter/ops/alertmanager).
FLEET = {
    "TrainingHung": ("TrainingFleetHung", "are hung"),
    "TrainingTargetDown": ("TrainingFleetTargetDown", "have vanished (their exporters cannot be scraped)"),
    "TrainingLossNotFinite": ("TrainingFleetLossNotFinite", "went non-finite (NaN/Inf loss or gradients)"),
}


def scope_labels(t: Thresholds) -> List[str]:
    """The labels of a scope: the identity labels without ``run`` (``cluster, namespace, job``)."""
    return [label.strip() for label in t.identity.split(",") if label.strip() != "run"]


def fleet_min_runs(t: Thresholds) -> int:
    value = t.number("alerting.fleet_min_runs")
    if value != int(value) or value < 2:
        raise ThresholdsError(f"{t.source}: alerting.fleet_min_runs must be a whole number of at least 2, "
                              f"got {value:g}")
    return int(value)


def recording(t: Thresholds) -> Dict[str, str]:
    """No fleet recording rules: the fleet alerts count the per-run alerts' ``ALERTS`` series."""
    return {}


def fast_recording(t: Thresholds) -> Dict[str, str]:
    """None, as above."""
    return {}


def alerts(t: Thresholds) -> List[Alert]:
    """One fleet alert per per-run kind in ``FLEET``, the Watchdog and the failed-notifications alert."""
    scope = scope_labels(t)
    where = " ".join(f"{label}={{{{ $labels.{label} }}}}" for label in scope) or "this Prometheus"
    minimum = fleet_min_runs(t)
    out = [Alert(fleet, f"""
            count by ({", ".join(scope)}) (count by ({t.identity}) (ALERTS{{alertname="{per_run}", alertstate="firing"}}))
              >= {num(minimum)}""",
                 "0m",
                 f"Many training runs of one scope {what} at once: one cause, one incident.",
                 f"{{{{ $value }}}} runs in {where} fire {per_run} (at least {minimum} make a fleet incident); their "
                 f"per-run notifications are held back. Look for the shared cause: storage, network, scheduler, "
                 f"a node pool, a bad data shard.",
                 OVERVIEW_DASHBOARD)
           for per_run, (fleet, what) in FLEET.items()]
    am = t.text("alerting.alertmanager_selector")
    window = t.duration("alerting.notifications_failed_window")
    out += [
        Alert("Watchdog", "vector(1)", "0m",
              "Always firing: the alerting pipeline works end to end.",
              "This alert always fires. A dead man's switch that stops receiving it knows that Prometheus, "
              "Alertmanager or the path between them is down.",
              None),
        Alert("AlertmanagerNotificationsFailing", f"""
            sum by (instance, integration) (increase(alertmanager_notifications_failed_total{{{am}}}[{window}])) > 0""",
              t.duration("alerting.notifications_failed_for"),
              "Alertmanager fails to deliver notifications: alerts may reach nobody.",
              f"Alertmanager {{{{ $labels.instance }}}} failed {{{{ $value | humanize }}}} {{{{ $labels.integration }}}} "
              f"notification attempts in the last {window}.",
              None),
    ]
    return out
