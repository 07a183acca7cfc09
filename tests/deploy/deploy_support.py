"""Shared pieces of the deployment tests: the chart rendered by the real Helm SDK, and a
real Prometheus server started on a free loopback port."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "raresignal"
RULES_FILE = CHART_DIR / "files" / "rules.yaml"
DASHBOARD_FILE = CHART_DIR / "dashboards" / "raresignal.json"
CI_VALUES = sorted(CHART_DIR.glob("ci/*-values.yaml"))
MONITORING_API = "monitoring.coreos.com/v1"
# Grafana's variables, as Grafana would substitute them before sending a query (each one
# set to "All" where it is the dashboard's own).
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "30s", "run": ".*",
                     "run_id": ".*", "probe": ".*"}
# The newest Kubernetes version kubernetes-validate ships schemas for, and the one the
# chart is rendered for.
KUBE_VERSION = "1.37.0"


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render_chart(values: dict[str, Any] | None = None, *, api_versions: Sequence[str] = (),
                 name: str = "rs", namespace: str = "ml") -> dict[str, str]:
    """The chart rendered offline by Helm's Go SDK (``helm template``).

    ``Chart.render`` of helm-python-sdk has no ``api_versions`` keyword, but the C ABI's
    render options take ``api_versions`` and ``kube_version`` exactly as ``helm template
    --api-versions --kube-version`` do, so the options go to that call directly.
    """
    import helm_python
    from helm_python import _native

    options = {"name": name, "namespace": namespace, "api_versions": list(api_versions),
               "kube_version": "v" + KUBE_VERSION}
    with helm_python.Chart.load(CHART_DIR) as chart:
        rendered = _native.call_string("helm_render", chart._raw(),
                                       json.dumps(values or {}), json.dumps(options))
    return json.loads(rendered)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a rendering (NOTES.txt and empty templates left out)."""
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def substitute_variables(expr: str) -> str:
    """``expr`` with each ``$name`` replaced whole (``$run`` is not the start of
    ``$run_id``); an unknown variable raises KeyError."""
    return re.sub(r"\$(\w+)", lambda match: GRAFANA_VARIABLES[match.group(1)], expr)


def dashboard_queries() -> dict[str, str]:
    """Panel title / refId -> expression, with Grafana's variables substituted."""
    queries = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries[f"{panel['title']} / {target['refId']}"] = substitute_variables(
                target["expr"])
    return queries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """A real ``prometheus`` process on loopback with its own TSDB in a temporary folder."""

    def __init__(self, binary: str, work_dir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = work_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = work_dir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config_path}",
                 f"--storage.tsdb.path={work_dir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(deadline_seconds=30)

    def _wait_ready(self, deadline_seconds: float) -> None:
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready:\n{self.log_path.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; a 4xx answer (a query Prometheus rejects) is returned too."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
