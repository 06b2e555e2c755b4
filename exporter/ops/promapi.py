"""A small client of Prometheus's HTTP query API, used by the report and the tests (standard library only)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """The body of a GET request to ``url``."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


class PrometheusClient:
    """A client of a Prometheus server's HTTP query API."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise RuntimeError(f"Prometheus API error for {params}: {body.get('error', exc)}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API error for {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time_: Optional[float] = None) -> List[Dict[str, Any]]:
        """Instant vector result of ``expr`` as a list of {"metric": labels, "value": float}."""
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": float(data["result"][1])}]
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> List[Dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        return [{"metric": r["metric"], "values": [(float(t), float(v)) for t, v in r["values"]]}
                for r in data["result"]]

    def wait_for(self, expr: str, timeout: float = 30.0, interval: float = 0.5) -> List[Dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for {expr!r} after {timeout}s")
            time.sleep(interval)
