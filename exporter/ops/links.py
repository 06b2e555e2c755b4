"""Absolute links of the alerts: the runbook and the Grafana dashboards, from the thresholds file's ``links``."""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from .thresholds import Thresholds, ThresholdsError

RUN_UID = "training-run"
OVERVIEW_UID = "training-overview"
# What an alert's ``dashboard_url`` opens: the run dashboard with the alert's run selected, the overview with its
# scope selected (fleet alerts), or nothing (alerts about the alerting pipeline).
RUN_DASHBOARD, OVERVIEW_DASHBOARD = "run", "overview"


def base_url(t: Thresholds, key: str) -> str:
    """An absolute http(s) URL of the thresholds file, without a trailing slash: links must open from a phone."""
    value = t.text(key)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ThresholdsError(f"{t.source}: {key} must be an absolute http(s) URL, got {value!r}")
    return value.rstrip("/")


def dashboard_url(t: Thresholds, dashboard: Optional[str]) -> Optional[str]:
    """The Grafana link of an alert: every identity label of the alert (only the scope for the overview) becomes
    the dashboard variable of that name, filled in by Prometheus's templating. A label the site does not attach is
    passed empty, which selects the series without it."""
    if dashboard is None:
        return None
    grafana = base_url(t, "links.grafana_url")
    labels = [x.strip() for x in t.identity.split(",")]
    if dashboard != RUN_DASHBOARD:
        labels.remove("run")
    query = "&".join(f"var-{x}={{{{ $labels.{x} | urlquery }}}}" for x in labels)
    uid = RUN_UID if dashboard == RUN_DASHBOARD else OVERVIEW_UID
    return f"{grafana}/d/{uid}/{uid}?{query}"
