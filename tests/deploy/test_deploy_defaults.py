"""Where the chart, the image or the runbooks state a default, it is the code's.

Each default has one home: ``ServerConfig`` for the server's settings, the default rules
file for the alert rules, ``MonitorConfig`` for the agent's. The chart, the Dockerfile and
the runbooks repeat some of them for their readers; these tests keep the copies in step.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from deploy_support import (
    CHART_DIR,
    REPO_ROOT,
    RULES_FILE,
    by_kind,
    load_values,
    manifests,
    render_chart,
)

from raresignal.agent import MonitorConfig
from raresignal.server.alerting.rules import load_rules
from raresignal.server.serving.app import ServerConfig

DEFAULTS = ServerConfig()
EVERY_INTERFACE = "0.0.0.0"


def _default_ports() -> dict[str, int]:
    return {"grpc": DEFAULTS.grpc_port, "health": DEFAULTS.health_port,
            "metrics": DEFAULTS.metrics_port}


def _server_container() -> dict[str, Any]:
    (deployment,) = by_kind(manifests(render_chart()), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_chart_values_state_the_server_defaults() -> None:
    values = load_values(CHART_DIR / "values.yaml")
    assert values["server"]["finishedRunTtlSeconds"] == DEFAULTS.finished_run_ttl_seconds
    assert values["server"]["retentionDays"] == DEFAULTS.retention.max_age_days
    assert values["server"]["maxHealthWatches"] == DEFAULTS.max_health_watches
    assert values["service"]["ports"] == _default_ports()


def test_the_chart_listens_on_every_interface_at_the_default_ports() -> None:
    # The server binds loopback unless told otherwise; a pod must be reachable.
    assert DEFAULTS.host != EVERY_INTERFACE
    container = _server_container()
    assert f"--host={EVERY_INTERFACE}" in container["args"]
    for name, port in _default_ports().items():
        assert f"--{name}-port={port}" in container["args"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == _default_ports()


def test_the_image_listens_on_every_interface_at_the_default_ports() -> None:
    lines = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    (command,) = [json.loads(line[len("CMD "):]) for line in lines if line.startswith("CMD ")]
    assert command[command.index("--host") + 1] == EVERY_INTERFACE
    (exposed,) = [line.split()[1:] for line in lines if line.startswith("EXPOSE ")]
    assert sorted(map(int, exposed)) == sorted(_default_ports().values())
    assert f"RARESIGNAL_HEALTH_PORT={DEFAULTS.health_port}" in "\n".join(lines)


def test_the_runbooks_state_the_stall_window_of_the_default_rules() -> None:
    (stalled,) = [rule for rule in load_rules() if rule.alert == "RunStalled"]
    assert stalled.stall is not None
    mirror = next(rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"]
                  for rule in group["rules"] if rule["alert"] == "RunStalled")
    readme = (CHART_DIR.parent / "README.md").read_text()
    runbook = readme.split("### RunStalled", 1)[1].split("\n### ", 1)[0]
    pattern = re.compile(r"(\d+(?:\.\d+)?) times\s+its\s+usual\s+time\s+between\s+steps"
                         r"\s+\(at\s+least\s+(\d+(?:\.\d+)?)\s+s\)")
    for text in (mirror["annotations"]["description"], runbook):
        stated = pattern.findall(text)
        assert stated, text
        assert {(float(factor), float(floor)) for factor, floor in stated} == {
            (stalled.stall.step_time_factor, stalled.stall.floor_seconds)}


def test_the_overhead_runbook_states_the_agents_target() -> None:
    readme = (CHART_DIR.parent / "README.md").read_text()
    (stated,) = re.findall(r"budget scheduler\s+aims at (\d+(?:\.\d+)?)%", readme)
    assert float(stated) / 100 == MonitorConfig().target_overhead
